#!/usr/bin/env python
"""Train a Llama from scratch, or fine-tune any checkpoint (fully or with LoRA), on your own text.

Data: .txt files are tokenized and packed into windows of --seq-len tokens; .jsonl files hold one record per
line, {"text": "..."} or a chat {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
(the loss is then on assistant tokens only). The last --val-fraction of the windows is held out: every
--eval-every steps the validation loss, perplexity and a short sample are printed.

Output in --out DIR: run.json (settings), metrics.jsonl (one JSON line per step: step, loss, lr, ...),
checkpoints/step_N/ (resumable: weights, AdamW state, RNG, data position; --save-every / --stop-after) and
final/ (the trained model, LoRA merged, in llama_min's own format with its tokenizer: load it with
load_checkpoint, Llama.build or scripts/generate.py --ckpt DIR/final). --resume continues the run in DIR
from its last checkpoint and reproduces the losses of an uninterrupted run exactly.

Examples:
  python scripts/train.py --config tiny --data data/shakespeare.txt --out runs/tiny --max-steps 300
  python scripts/train.py --init model.gguf --data chat.jsonl --out runs/ft --lora-rank 8 --lr 1e-3
  python scripts/train.py --out runs/tiny --resume
  torchrun --nproc_per_node 2 scripts/train.py --config tiny --data notes.txt --out runs/ddp [--fsdp]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_min.train_config import DOC, TrainConfig, read_json_file  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error here
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="MODEL.json", help=_help("config"))
    src.add_argument("--init", metavar="CKPT", help=_help("init"))
    g.add_argument("--tokenizer", metavar="PATH", help=_help("tokenizer"))
    g.add_argument("--data", metavar="FILE", nargs="+", help=_help("data"))
    g.add_argument("--out", metavar="DIR", help=_help("out"))
    g.add_argument("--train-config", metavar="TRAIN.json",
                   help="training settings as JSON (the keys below, underscores for dashes); flags override it")

    g = p.add_argument_group("schedule and optimizer")
    for name, typ in (("max_steps", int), ("batch_size", int), ("grad_accum", int), ("seq_len", int),
                      ("lr", float), ("min_lr_ratio", float), ("warmup_steps", int), ("weight_decay", float),
                      ("beta1", float), ("beta2", float), ("adam_eps", float), ("grad_clip", float), ("seed", int)):
        _add(g, name, typ)

    g = p.add_argument_group("evaluation, logging and checkpoints")
    for name, typ in (("val_fraction", float), ("eval_every", int), ("eval_batches", int), ("sample_prompt", str),
                      ("sample_tokens", int), ("save_every", int), ("keep_checkpoints", int)):
        _add(g, name, typ)
    g.add_argument("--stop-after", type=int, metavar="K", help="end the process after step K with a checkpoint, "
                   "as an interruption would (continue with --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(its saved settings are used; flags given now override them)")

    g = p.add_argument_group("speed, memory and devices")
    for name in ("bf16", "grad_checkpointing", "fsdp"):
        g.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=_help(name))
    _add(g, "device", str)
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")

    g = p.add_argument_group("LoRA")
    for name, typ in (("lora_rank", int), ("lora_alpha", float), ("lora_dropout", float), ("lora_targets", str)):
        _add(g, name, typ)
    return p.parse_args(argv)


def _help(name: str) -> str:
    return DOC[name].replace("%", "%%")  # argparse formats help strings with %


def _add(group, name: str, typ) -> None:
    default = getattr(TrainConfig, name, None)
    group.add_argument("--" + name.replace("_", "-"), type=typ, metavar=name.split("_")[-1].upper(),
                       help=_help(name) + ("" if default is None else f" (default {default})"))


def build_config(ns) -> tuple:
    """(TrainConfig, resume, stop_after) from the flags, --train-config and (when resuming) OUT/run.json."""
    flags = {k: v for k, v in vars(ns).items() if k not in ("train_config", "resume", "stop_after", "threads")}
    resume = getattr(ns, "resume", False)
    cfg = TrainConfig()
    if resume:
        if "out" not in flags:
            raise ValueError("--resume needs --out DIR (the run to continue)")
        saved = Path(flags["out"]) / "run.json"
        if saved.is_file():
            cfg = cfg.updated(read_json_file(saved, "run settings"), str(saved))
            if "config" in flags or "init" in flags:  # the flag names the source: drop the saved other one
                cfg = cfg.updated({"config": None, "init": None}, "flags")
    if "train_config" in ns:
        cfg = cfg.updated(read_json_file(ns.train_config, "training config"), ns.train_config)
    cfg = cfg.updated(flags, "flags")
    return cfg, resume, getattr(ns, "stop_after", None)


def main(argv=None) -> int:
    ns = parse_args(argv)
    try:
        cfg, resume, stop_after = build_config(ns)
        if stop_after is not None and not 1 <= stop_after:
            raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
        import torch

        if getattr(ns, "threads", None):
            torch.set_num_threads(ns.threads)
        from llama_min.train import train

        train(cfg, resume=resume, stop_after=stop_after)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; say it once
            print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint (if any) can be resumed with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
