"""Train a model from scratch or fine-tune a checkpoint (fully or with LoRA) on your text.

The flags are those of the training command (`llama-min train --help`); this module only routes to it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from ..errors import EnvironmentFailure
from .common import run_main


def training_entry():
    """The training command's `main(argv) -> int`: llama_min.train_cli, or scripts/train.py in a checkout."""
    try:
        from ..train_cli import main as entry

        return entry
    except ModuleNotFoundError as e:
        if e.name != "llama_min.train_cli":
            raise
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    if not script.is_file():
        raise EnvironmentFailure("llama-min train needs the module llama_min.train_cli, which this installation "
                                 "of llama_min does not have")
    spec = importlib.util.spec_from_file_location("llama_min_train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main(argv=None, prog: Optional[str] = None) -> int:
    """`prog` is unused: the command's own parser names itself. --debug is taken here, not passed on."""
    return run_main(lambda argv: training_entry()([a for a in argv if a != "--debug"]), argv)
