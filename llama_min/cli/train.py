"""The `train` command: train a Llama from scratch, or fine-tune any checkpoint (fully or with LoRA), on your
own text.

Data: .txt files are tokenized and packed into windows of --seq-len tokens; .jsonl files hold one record per
line, {"text": "..."} or a chat {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
(the loss is then on assistant tokens only). The last --val-fraction of the windows is held out: every
--eval-every steps the validation loss, perplexity and a short sample are printed.

Output in --out DIR: run.json (settings), metrics.jsonl (one JSON line per step: step, loss, lr, ...),
checkpoints/step_N/ (resumable: weights, AdamW state, RNG, data position; --save-every / --stop-after) and
final/ (the trained model, LoRA merged, in llama_min's own format with its tokenizer: try it with
llama-min generate --ckpt DIR/final). An existing folder is never written into unless it is this run's
(--resume) or --overwrite says so.

--resume continues the run in DIR from its last checkpoint and reproduces the losses of an uninterrupted
run exactly. A finished run resumed with a larger --max-steps trains on from final/ when no checkpoint is as
new: its weights (a LoRA run: fresh adapters on the merged weights) and data position, a fresh AdamW, the LR
schedule of the new --max-steps; the old final/ stays until the new one is complete and metrics.jsonl is
appended to. With the same --max-steps there is nothing to do and nothing is touched.

Before building the model the peak memory of a training step is estimated (weights, gradients, AdamW,
activations, logits); a run that cannot fit the free memory is refused with the numbers and the flags that
lower it. The progress bar is drawn only when stderr is a terminal; the last line says why the run stopped.

--rope-scaling TYPE:FACTOR[,key=value...] trains the model with that RoPE scaling (replacing its config's or
checkpoint's; final/params.json keeps it, so generate and eval run it too): e.g. fine-tune for 4x the window.

Examples:
  llama-min train --config tiny --data data/shakespeare.txt --out runs/tiny --max-steps 300
  llama-min train -m runs/tiny/final --data long.txt --out runs/long --seq-len 1024 --rope-scaling linear:4
  llama-min train -m model.gguf --data chat.jsonl --out runs/ft --lora-rank 8 --lr 1e-3
  llama-min train --out runs/tiny --resume
  llama-min train --out runs/tiny --resume --max-steps 600      (a finished run, trained on)
  torchrun --nproc_per_node 2 scripts/train.py --config tiny --data notes.txt --out runs/ddp [--fsdp]
"""

from __future__ import annotations

import argparse
import os

from pathlib import Path

from .common import Parser, classify, run_main
from .loading import announce_loading
from ..errors import LlamaMinError
from ..files import read_json
from ..formats import formats_sentence
from ..train.config import DOC, TrainConfig

RUN_FLAGS = ("train_config", "resume", "stop_after", "threads", "overwrite", "debug")  # not training settings


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    """The flags; only those given appear in the namespace (so a resumed run keeps its saved settings)."""
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
               argument_default=argparse.SUPPRESS)  # one-line flag errors; --debug shows tracebacks
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="MODEL.json", help=_help("config"))
    src.add_argument("-m", "--ckpt", "--init", dest="init", metavar="CKPT",
                     help="checkpoint to fine-tune: " + formats_sentence().replace("%", "%%"))
    g.add_argument("--tokenizer", metavar="PATH", help=_help("tokenizer"))
    g.add_argument("--data", metavar="FILE", nargs="+", help=_help("data"))
    g.add_argument("--out", metavar="DIR", help=_help("out"))
    g.add_argument("--rope-scaling", metavar="TYPE:FACTOR", help=_help("rope_scaling"))
    g.add_argument("--train-config", metavar="TRAIN.json",
                   help="training settings as JSON (the keys below, underscores for dashes); flags override it")
    _add_all(p.add_argument_group("schedule and optimizer"), (
        ("max_steps", int), ("batch_size", int), ("grad_accum", int), ("seq_len", int), ("lr", float),
        ("min_lr_ratio", float), ("warmup_steps", int), ("weight_decay", float), ("beta1", float),
        ("beta2", float), ("adam_eps", float), ("grad_clip", float), ("seed", int)))
    g = p.add_argument_group("evaluation, logging and checkpoints")
    _add_all(g, (("val_fraction", float), ("eval_every", int), ("eval_batches", int), ("sample_prompt", str),
                 ("sample_tokens", int), ("save_every", int), ("keep_checkpoints", int)))
    g.add_argument("--stop-after", type=int, metavar="K", help="end the process after step K with a checkpoint, "
                   "as an interruption would (continue with --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "or a finished run from final/ to a larger --max-steps (its saved settings are used; flags "
                   "given now override them)")
    g.add_argument("--overwrite", action="store_true", help="start again in an --out folder that already holds "
                   "files (a previous run's files there are deleted)")
    g = p.add_argument_group("speed, memory and devices")
    for name in ("bf16", "grad_checkpointing", "fsdp"):
        g.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=_help(name))
    _add(g, "device", str)
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    _add_all(p.add_argument_group("LoRA"), (("lora_rank", int), ("lora_alpha", float), ("lora_dropout", float),
                                            ("lora_targets", str)))
    return p.parse_args(argv)


def _help(name: str) -> str:
    return DOC[name].replace("%", "%%")  # argparse formats help strings with %


def _add(group, name: str, typ) -> None:
    default = getattr(TrainConfig, name, None)
    group.add_argument("--" + name.replace("_", "-"), type=typ, metavar=name.split("_")[-1].upper(),
                       help=_help(name) + ("" if default is None else f" (default {default})"))


def _add_all(group, names) -> None:
    for name, typ in names:
        _add(group, name, typ)


def build_config(ns: argparse.Namespace) -> TrainConfig:
    """The settings: defaults < (resuming) OUT/run.json < --train-config < flags."""
    flags = {k: v for k, v in vars(ns).items() if k not in RUN_FLAGS}
    cfg = TrainConfig()
    if getattr(ns, "resume", False):
        from ..train.state import RunDir  # torch: only once the flags are good

        if "out" not in flags:
            raise LlamaMinError("--resume needs --out DIR (the folder of the run to continue)")
        run = RunDir(flags["out"])
        run.check(resume=True, overwrite=False)  # a missing folder is named before anything else
        cfg = cfg.updated(read_json(run.path / "run.json", "run settings"), str(run.path / "run.json"))
        if "config" in flags or "init" in flags:  # the flag names the source: drop the saved other one
            cfg = cfg.updated({"config": None, "init": None}, "flags")
    if "train_config" in ns:
        cfg = cfg.updated(read_json(ns.train_config, "training config"), ns.train_config)
    return cfg.updated(flags, "flags")


def run(argv=None, prog=None) -> None:
    """Parse the flags, build the settings and train; errors propagate (`main` turns them into exit codes)."""
    ns = parse_args(argv, prog)
    cfg = build_config(ns)
    stop_after = getattr(ns, "stop_after", None)
    if stop_after is not None and stop_after < 1:
        raise LlamaMinError(f"--stop-after must be >= 1, got {stop_after}")
    import torch

    if getattr(ns, "threads", None):
        torch.set_num_threads(ns.threads)
    from ..train.dist import log
    from ..train.loop import finished_line, train

    resume = getattr(ns, "resume", False)
    line = finished_line(cfg) if resume else None
    if line is not None:
        log(line)
        return
    announce_checkpoint(cfg, resume)
    train(cfg, resume=resume, stop_after=stop_after, overwrite=getattr(ns, "overwrite", False))


def announce_checkpoint(cfg: TrainConfig, resume: bool) -> None:
    """`loading PATH (FORMAT, SIZE)...` for the checkpoint the run reads its weights from: the --init one, or
    final/ when a finished run continues (a hub id is left to the loader)."""
    from ..train.state import RunDir

    path = cfg.init
    if resume:
        start = RunDir(cfg.out).resume_from(bool(cfg.lora_rank))
        path = start.base or path
    if path is None or not Path(path).exists() or os.environ.get("RANK", "0") != "0":
        return
    announce_loading(path)


def main(argv=None, prog=None) -> int:
    """Run the command; a mistake is one line `error: ...` and exit code 2, 1 when the machine is at fault
    (the rule of llama_min.cli.common.run_main). Under torchrun only rank 0 prints the line."""
    if os.environ.get("RANK", "0") == "0":
        return run_main(lambda args: run(args, prog), argv)
    try:  # another rank of a torchrun job: it fails like rank 0, which says why
        run(argv, prog)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except BaseException as e:  # noqa: BLE001 - the exit code only
        return classify(e)[0]
    return 0
