"""Files: where they are and how they are read and written. This module: atomic writes and JSON.

  gguf.py   the GGUF container (header, metadata, tensor table), read without loading tensors
  hub.py    Hugging Face hub ids and cache folders resolved to a local folder

  atomic_write(path, content)      temp file in the same folder, then os.replace: never half-written
  publish_dir(final, build)        build a folder under a temp name, then rename it into place
  clean_stale_temps(folder)        remove temp leftovers of writes killed before their rename
  read_json(path, what)            a JSON object, errors naming the file (missing, not UTF-8, bad JSON)
  read_npz(path, keys, what)       a numpy .npz's arrays, never unpickled, the keys it must hold checked
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

from ..errors import LlamaMinError

TEMP_PREFIX = ".tmp-"  # every temp file or folder written here starts with this


def _normal_permissions(path: str, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)  # mkstemp makes 0600, mkdtemp 0700


def atomic_write(path, content: Union[bytes, str, Callable[[str], None]]) -> Path:
    """Write `content` (bytes, text, or a function that writes a given temp path) beside `path`, then rename.

    The temp file lives in the same folder (so the rename is atomic) and gets normal permissions; it is
    removed if writing fails (disk full, Ctrl-C).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        else:
            Path(tmp).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        _normal_permissions(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish_dir(final, build: Callable[[Path], None], replace: bool = False) -> Path:
    """Build a folder with `build(tmp_dir)` under a temp name beside `final`, then rename it to `final`.

    Readers see either no folder or a complete one. With replace=True an existing `final` is swapped out
    (renamed aside, then removed) after the new one is complete; otherwise an existing `final` is an error.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TEMP_PREFIX}{final.name}."))
    try:
        build(tmp)
        _normal_permissions(str(tmp), 0o777)
        if final.exists():
            if not replace:
                raise LlamaMinError(f"{final}: already exists")
            old = final.parent / f"{TEMP_PREFIX}{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clean_stale_temps(folder) -> list:
    """Remove temp files/folders (TEMP_PREFIX) left in `folder` by writes that were killed; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f"{TEMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def read_json(path, what: str = "JSON") -> dict:
    """A JSON object from a file; every failure is a LlamaMinError naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise LlamaMinError(f"{path}: no such {what} file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LlamaMinError(f"{path}: not UTF-8 text; expected a {what} file") from None
    except json.JSONDecodeError as e:
        raise LlamaMinError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise LlamaMinError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise LlamaMinError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_npz(path, keys, what: str) -> dict:
    """{name: array} of a .npz file with every name in `keys`; never unpickles (allow_pickle=False). A missing
    file raises FileNotFoundError; anything else that is not such a file, a LlamaMinError naming `what`."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            data = {name: f[name] for name in f.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:
        raise LlamaMinError(f"{path}: not {what} ({' '.join(str(e).split())})") from None
    missing = [key for key in keys if key not in data]
    if missing:
        raise LlamaMinError(f"{path}: not {what} (missing {', '.join(missing)})")
    return data
