"""Hugging Face hub ids and the Hugging Face cache -> a local checkpoint folder.

`resolve_checkpoint(x)` is what checkpoint and tokenizer loading call first:

  an existing path            wins; a cache folder `models--org--name` becomes its snapshot (refs/main,
                              else the newest one)
  "org/name[@revision]"       (only when no such path exists) the snapshot in the local cache if it is
                              complete, else a download with `huggingface_hub` (optional dependency:
                              `pip install 'llama_min[hub]'`) of the weights, config and tokenizer files only
  anything else               returned as a Path; the loader reports it missing

The cache is huggingface_hub's layout: `<cache>/models--org--name/refs/<branch>` holds a commit hash,
`<cache>/models--org--name/snapshots/<hash>/` the files (links into `blobs/`). `<cache>` is
$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. With HF_HUB_OFFLINE=1 nothing is
downloaded: a model missing from the cache is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..errors import EnvironmentFailure, LlamaMinError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
DOWNLOAD_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
]
INSTALL_HINT = "pip install 'llama_min[hub]'"


def resolve_checkpoint(path_or_id) -> Path:
    """A local path for a checkpoint path, a `models--org--name` cache folder or a hub id (see module doc)."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        return cache_folder_snapshot(path) if is_cache_folder(path) else path
    if not HUB_ID.fullmatch(text) or ".." in text:
        return path
    repo_id, _, revision = text.partition("@")
    return hub_snapshot(repo_id, revision or None)


def is_cache_folder(path: Path) -> bool:
    """A huggingface_hub cache folder of one repository: `models--org--name` with a `snapshots` folder."""
    return path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir()


def cache_folder_snapshot(folder: Path, revision: Optional[str] = None, strict: bool = False) -> Optional[Path]:
    """The snapshot folder `refs/<revision or main>` points to (or `snapshots/<revision>` for a commit hash).

    Without a matching ref the newest snapshot is taken (a repo downloaded by commit hash has no refs),
    unless `strict`, which returns None instead.
    """
    snapshots = folder / "snapshots"
    ref = folder / "refs" / (revision or "main")
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    if strict:
        return None
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise LlamaMinError(f"{folder}: Hugging Face cache folder without snapshots (an interrupted download?)")
    return found[-1]


def hf_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def snapshot_complete(snap: Path) -> bool:
    """config.json plus every weight file (all shards an index lists, or one model.safetensors)."""
    if not (snap / "config.json").is_file():
        return False
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        from . import read_json

        shards = set(read_json(index, "index").get("weight_map", {}).values())
        return bool(shards) and all((snap / s).is_file() for s in shards)
    return any(snap.glob("*.safetensors")) or any(snap.glob("pytorch_model*.bin"))


def hub_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    """The local snapshot of a hub repository: from the cache when complete, else downloaded."""
    cache = hf_cache_dir()
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    if folder.is_dir() and (folder / "snapshots").is_dir():
        snap = cache_folder_snapshot(folder, revision, strict=revision is not None)
        if snap is not None and snapshot_complete(snap):
            return snap
    name = repo_id + (f"@{revision}" if revision else "")
    if hub_offline():
        raise LlamaMinError(f"{name}: no such local path, and not in the Hugging Face cache ({cache}) "
                            "while HF_HUB_OFFLINE is set; download it once online")
    return _download(repo_id, revision, cache, name)


def _download(repo_id: str, revision: Optional[str], cache: Path, name: str) -> Path:
    """snapshot_download of the safetensors, config and tokenizer files; each failure as one clear line."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise LlamaMinError(f"{name}: no such local path; to load it as a Hugging Face hub id install "
                            f"huggingface_hub ({INSTALL_HINT})") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=DOWNLOAD_PATTERNS))
    except GatedRepoError:
        raise LlamaMinError(f"{repo_id}: a gated model: log in (`hf auth login` or HF_TOKEN) with an account that "
                            f"has accepted its licence at https://huggingface.co/{repo_id}") from None
    except RepositoryNotFoundError:
        raise LlamaMinError(f"{name}: no such local path, and no model '{repo_id}' on the Hugging Face hub "
                            "(a private one needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise LlamaMinError(f"{name}: '{repo_id}' has no revision '{revision}' on the Hugging Face hub") from None
    except HFValidationError as e:
        raise LlamaMinError(f"{name}: not a valid hub id ({str(e).splitlines()[0]})") from None
    except (LocalEntryNotFoundError, OSError) as e:  # no network, disk full, server error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EnvironmentFailure(f"{name}: download from the Hugging Face hub failed ({first})") from None
