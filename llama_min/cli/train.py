"""Train a model from scratch or fine-tune a checkpoint (fully or with LoRA) on your text.

The flags are those of the training command (`llama-min train --help`, llama_min/train_cli.py); this
module only routes to it.
"""

from __future__ import annotations

from typing import Optional

from .common import run_main


def main(argv=None, prog: Optional[str] = None) -> int:
    """The training command applies the exit-code rule (and --debug) itself; `prog` names it in messages."""
    from ..train_cli import main as train_main

    return run_main(lambda argv: train_main(argv, prog=prog), argv)
