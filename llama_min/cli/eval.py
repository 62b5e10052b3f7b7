"""Perplexity of a checkpoint on a text file (the flags are llama_min.perplexity's)."""

from __future__ import annotations

from typing import Optional

from ..errors import EnvironmentFailure
from .common import run_main


def evaluation_entry():
    """llama_min.perplexity.main, imported only when `eval` runs."""
    try:
        from ..perplexity import main as entry
    except ModuleNotFoundError as e:
        if e.name != "llama_min.perplexity":
            raise
        raise EnvironmentFailure("llama-min eval needs the module llama_min.perplexity, which this installation "
                                 "of llama_min does not have") from None
    return entry


def main(argv=None, prog: Optional[str] = None) -> int:
    """`prog` is unused: the command's own parser names itself. --debug is taken here, not passed on."""
    return run_main(lambda argv: evaluation_entry()([a for a in argv if a != "--debug"]), argv)
