"""Perplexity of a checkpoint on a text file (`llama-min eval`; the flags are llama_min.decoding.perplexity's)."""

from __future__ import annotations

from typing import Optional

from .common import run_main


def main(argv=None, prog: Optional[str] = None) -> int:
    """`prog` is unused: the command's own parser names itself. --debug is taken here, not passed on."""
    from ..decoding.perplexity import main as perplexity_main

    return run_main(lambda argv: perplexity_main([a for a in argv if a != "--debug"]), argv)
