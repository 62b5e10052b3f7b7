"""A run directory on disk: its checks, resumable checkpoints, metrics file, tokenizer files and final model.

  RunDir.check          before anything is written: is `--out` free, this run's, or finished?
  RunDir.start          rank 0 creates the folder: stale temps removed, run.json, the tokenizer file(s)
  RunDir.save           checkpoints/step_N/: trainable weights + AdamW state + every rank's RNG (safetensors)
                        and state.json (step, data position, settings), published as a whole folder
                        (`files.publish_dir`): a kill at any moment leaves the earlier checkpoints usable
  RunDir.restore        the newest checkpoint that reads back completely (a damaged one is reported and the
                        one before it is used), re-sharded for FSDP2
  RunDir.resume_from    where --resume continues: the newest checkpoint (exact), or final/ (its weights and
                        the step and data position in final/trained.json; a fresh optimizer) when no
                        checkpoint is as new
  RunDir.export         final/: the plain model in llama_min's format with its tokenizer and trained.json,
                        published as a whole: the previous final/ stays until the new one is complete
  metrics.jsonl         one JSON line per step, appended; on resume the lines a killed run wrote after the
                        resume point are dropped, the lines before it are kept byte for byte

Every write goes through llama_min.files; an OSError while writing (disk full, read-only folder) becomes an
`EnvironmentFailure` naming the path. Nothing here unpickles: tensors go through safetensors, the rest JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import EnvironmentFailure, LlamaMinError
from ..files import TEMP_PREFIX, atomic_write, clean_stale_temps, publish_dir, read_json
from .dist import Dist, full_tensor, like, log

CKPT_DIR = "checkpoints"
TRAINED = "trained.json"  # in final/: {"step", "samples_seen"} of the model published there
RUN_ENTRIES = ("run.json", "metrics.jsonl", CKPT_DIR, "final", "tokenizer.model", "tokenizer")  # what a run writes


@contextlib.contextmanager
def writing(target: Path, what: str):
    """Turn a failed write (OSError, or safetensors' error wrapping one) into one line naming `target`."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        raise EnvironmentFailure(f"{target}: {e.strerror or e} (while writing {what})") from None
    except SafetensorError as e:  # safetensors reports an I/O failure as "... (os error N) ..."
        code = re.search(r"os error (\d+)", str(e))
        reason = os.strerror(int(code.group(1))) if code else str(e)
        raise EnvironmentFailure(f"{target}: {reason} (while writing {what})") from None


@dataclass
class ResumeFrom:
    """Where a run starts: step 0, a checkpoint (exact resume) or final/ (its weights, a fresh optimizer).

    `base` is the folder whose weights the model is built from instead of --config / --init (final/ when the
    run continues a finished one); `samples` is the data position (None: step * windows per step).
    """

    kind: str                  # "start" | "checkpoint" | "final"
    step: int = 0
    samples: Optional[int] = 0
    base: Optional[Path] = None
    base_step: Optional[int] = None  # the step of final/ the weights were continued from (saved in checkpoints)


class RunDir:
    """The folder given by --out and what a run keeps in it."""

    def __init__(self, path):
        self.path = Path(path)
        self.ckpt_root = self.path / CKPT_DIR
        self.metrics_path = self.path / "metrics.jsonl"
        self.final = self.path / "final"

    # ------------------------------------------------------------------------------------- before a run

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse an --out this run must not write into (read-only: nothing is written here)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise LlamaMinError(f"{p}: is a file; --out needs a folder for the run")
        if resume:
            if not p.is_dir():
                raise LlamaMinError(f"{p}: no such folder; --resume continues the run saved in --out DIR")
            if not (p / "run.json").is_file():
                raise LlamaMinError(f"{p}: holds no run (no run.json); --resume continues a run started there")
            return
        if overwrite or not p.is_dir() or not any(not e.name.startswith(TEMP_PREFIX) for e in p.iterdir()):
            return  # new, empty, or holding only the temp leftovers of a start that was killed
        if (p / "run.json").is_file():
            raise LlamaMinError(f"{p}: already holds a run; add --resume to continue it, --overwrite to start "
                                "it again, or pick another --out")
        raise LlamaMinError(f"{p}: folder is not empty and holds no run; pick another --out (or --overwrite)")

    def last_logged_step(self) -> int:
        """The highest step in metrics.jsonl (0 without one)."""
        return max((rec["step"] for rec in self._metrics_records()), default=0)

    def final_state(self) -> Optional[dict]:
        """{"step", "samples_seen"} of the model in final/ (None without one). A final/ written before
        trained.json existed is at the last logged step (its data position is then unknown: None)."""
        if not (self.final / "params.json").is_file():
            return None
        if (self.final / TRAINED).is_file():
            state = read_json(self.final / TRAINED, "final model state")
            if isinstance(state.get("step"), int):
                return {"step": state["step"], "samples_seen": state.get("samples_seen")}
        return {"step": self.last_logged_step(), "samples_seen": None}

    def newest_checkpoint_state(self) -> Optional[dict]:
        """state.json of the newest checkpoint whose state reads back (None: no checkpoint)."""
        for ckpt in reversed(self.checkpoints()):
            try:
                state = read_json(ckpt / "state.json", "checkpoint state")
            except LlamaMinError:
                continue
            if isinstance(state.get("step"), int):
                return state
        return None

    def resume_from(self, lora: bool) -> ResumeFrom:
        """Where --resume continues: the newest of final/ and the checkpoints.

        A checkpoint as new as final/ wins (it holds AdamW's state too), except for LoRA: final/ holds the
        adapters merged, so a LoRA run continues from final/ with fresh adapters. A LoRA checkpoint of a run
        that continued from final/ is restored onto final/'s weights (its `base_step`).
        """
        final, ckpt = self.final_state(), self.newest_checkpoint_state()
        if final is not None and (ckpt is None or ckpt["step"] < final["step"]
                                  or (lora and ckpt["step"] == final["step"])):
            return ResumeFrom("final", final["step"], final["samples_seen"], self.final, final["step"])
        if ckpt is None:
            return ResumeFrom("start")
        base_step = ckpt.get("base_step")
        base = self.final if lora and base_step is not None else None
        if base is not None and (final is None or final["step"] != base_step):
            raise LlamaMinError(f"{self.ckpt_root}: the LoRA checkpoint of step {ckpt['step']} was trained on "
                                f"{self.final} of step {base_step}, which is no longer there; start the run "
                                "again with --overwrite")
        return ResumeFrom("checkpoint", ckpt["step"], ckpt.get("samples_seen"), base, base_step)

    # --------------------------------------------------------------------------------------- starting

    def start(self, settings: dict, tokenizer_blobs: dict, overwrite: bool) -> None:
        """Rank 0: remove stale temps (and with `overwrite` the previous run), write run.json and tokenizer."""
        if Dist.rank == 0:
            with writing(self.path, "the run folder"):
                if overwrite:
                    for name in RUN_ENTRIES:
                        _remove(self.path / name)
                self.path.mkdir(parents=True, exist_ok=True)
                self._recover_final()
                for folder in (self.path, self.ckpt_root, self.path / "tokenizer"):
                    _clean_temps(folder)
                for target, blob in tokenizer_blobs.items():
                    atomic_write(target, blob)
                atomic_write(self.path / "run.json", json.dumps(settings, indent=2))
        Dist.barrier()

    def _recover_final(self) -> None:
        """A kill between publish_dir's two renames leaves final/ aside as a temp folder: put it back
        before the temps are cleaned, so a finished model is never lost."""
        aside = self.path / f"{TEMP_PREFIX}final.old"
        if not self.final.exists() and (aside / "params.json").is_file():
            os.replace(aside, self.final)
            log(f"restored {self.final} (moved aside by an interrupted export)")

    # ------------------------------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list:
        """Published checkpoint folders, oldest first (temp folders of an interrupted save are not listed)."""
        if not self.ckpt_root.is_dir():
            return []
        return sorted(p for p in self.ckpt_root.iterdir() if p.name.startswith("step_") and p.is_dir())

    def save(self, step: int, named: list, opt, state: dict, device, keep: int) -> None:
        """Write checkpoints/step_N/ as one published folder, then prune to the `keep` newest.

        `named`: the trainable (name, parameter) pairs as the optimizer holds them (`trainable_named`, taken
        right after wrapping). Every rank must call this (FSDP shards are gathered); only rank 0 writes. A
        failed write removes its temp folder and raises an EnvironmentFailure on every rank; the earlier
        checkpoints stay.
        """
        tensors = checkpoint_tensors(named, opt, device)
        target = self.ckpt_root / f"step_{step:08d}"
        error = None
        if Dist.rank == 0:
            state = {**state, "step": step, "world_size": Dist.world}
            try:
                with writing(target, f"the checkpoint of step {step}"):
                    publish_dir(target, lambda tmp: write_checkpoint(tmp, *tensors, state), replace=True)
                self._prune(target, keep)
            except EnvironmentFailure as e:
                error = str(e)
        error = Dist.broadcast_object(error)
        if error:
            raise EnvironmentFailure(error)

    def _prune(self, newest: Path, keep: int) -> None:
        """Delete checkpoints past `newest` (left by a run that resumed before them) and all but `keep`."""
        ckpts = self.checkpoints()
        older = [c for c in ckpts if c.name < newest.name]
        for stale in [c for c in ckpts if c.name > newest.name] + older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def restore(self, named: list, opt, device) -> dict | None:
        """Load the newest checkpoint that reads back completely; return its state.json (None: no checkpoint).

        A damaged one (cut-off file, broken JSON, missing tensor) is reported on stderr and the one before it
        is tried; it is an error when checkpoints exist but none is usable.
        """
        ckpts = self.checkpoints()
        for i in range(len(ckpts) - 1, -1, -1):
            try:
                loaded = read_checkpoint(ckpts[i], named)
            except LlamaMinError as e:
                log(f"warning: {e}; " + (f"falling back to {ckpts[i - 1]}" if i else "no earlier checkpoint"))
                continue
            apply_checkpoint(loaded, named, opt, device)
            return loaded[0]
        if ckpts:
            raise LlamaMinError(f"{self.ckpt_root}: no checkpoint reads back completely; "
                                "start the run again with --overwrite")
        return None

    # ------------------------------------------------------------------------------------------ metrics

    def _metrics_records(self) -> list:
        """The well-formed records of metrics.jsonl (a line cut short by a kill is skipped)."""
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
        return out

    def truncate_metrics(self, last_step: int) -> None:
        """Rank 0: keep the lines of steps <= last_step byte for byte (one per step), dropping what a killed
        run wrote after the resume point; the file is rewritten only when there is something to drop."""
        if Dist.rank or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_bytes().splitlines(keepends=True)
        kept, seen = [], set()
        for line in lines:
            step = _record_step(line)
            if step is not None and step <= last_step and step not in seen:
                seen.add(step)
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        if kept == lines:
            return
        with writing(self.metrics_path, "the metrics"):
            atomic_write(self.metrics_path, b"".join(kept))

    def append_metrics(self, rec: dict) -> None:
        """Rank 0: one more JSON line in metrics.jsonl."""
        if Dist.rank:
            return
        with writing(self.metrics_path, "the metrics"):
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------- export

    def export(self, args, state_dict: dict, tokenizer_files: list, trained: dict) -> Path:
        """Rank 0: publish final/ (params.json, model.safetensors, tokenizer file(s), trained.json = `trained`),
        replacing an older one only once the new one is complete."""
        from ..checkpoint import save_checkpoint

        def build(tmp: Path) -> None:
            save_checkpoint(tmp, args, state_dict, tokenizer_files)
            (tmp / TRAINED).write_text(json.dumps(trained), encoding="utf-8")

        error = None
        if Dist.rank == 0:
            try:
                with writing(self.final, "the final model"):
                    publish_dir(self.final, build, replace=True)
            except EnvironmentFailure as e:
                error = str(e)
        error = Dist.broadcast_object(error)
        if error:
            raise EnvironmentFailure(error)
        return self.final


def _record_step(line: bytes) -> Optional[int]:
    """The step of one metrics.jsonl line (None for a line cut short or not a step record)."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec["step"] if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean_temps(folder: Path) -> None:
    """Remove temp leftovers of killed writes; a failure here only costs disk space, so it is not fatal."""
    try:
        for p in clean_stale_temps(folder):
            log(f"removed {p} (left by an interrupted write)")
    except OSError as e:
        log(f"note: could not remove temp files in {folder} ({e.strerror or e})")


# ----------------------------------------------------------------------------- checkpoint contents


def rng_states(device: torch.device) -> dict:
    """Every rank's torch RNG state (CPU, and CUDA when used), gathered to all ranks."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    states = Dist.all_gather_object(mine)
    return {f"rng.{kind}.{r}": t for r, s in enumerate(states) for kind, t in s.items()}


def checkpoint_tensors(named: list, opt, device) -> tuple:
    """(trainable weights, AdamW state + RNG states): whole CPU tensors; every rank must call this."""
    weights = {name: full_tensor(p) for name, p in named}
    extra = {}
    for name, p in named:
        for key, value in opt.state.get(p, {}).items():
            extra[f"{name}.{key}"] = full_tensor(value) if value.ndim else value.detach().cpu().reshape(())
    return weights, {**extra, **rng_states(device)}


def write_checkpoint(folder: Path, weights: dict, extra: dict, state: dict) -> None:
    """The files of one checkpoint, into a fresh (temp) folder that is published as a whole."""
    from safetensors.torch import save_file

    save_file(weights, str(folder / "model.safetensors"))
    save_file(extra, str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_checkpoint(ckpt: Path, named: list) -> tuple:
    """(state, weights, extra) of a checkpoint, read completely and checked against the model's trainable
    parameters before anything is applied; a LlamaMinError naming the file if it does not read back."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_json(ckpt / "state.json", "checkpoint state")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("samples_seen"), int):
        raise LlamaMinError(f"{ckpt / 'state.json'}: no step / samples_seen")
    tensors = []
    for name in ("model.safetensors", "optimizer.safetensors"):
        try:
            tensors.append(load_file(str(ckpt / name)))
        except (SafetensorError, OSError) as e:
            raise LlamaMinError(f"{ckpt / name}: does not read back ({e})") from None
    weights, extra = tensors
    for name, _ in named:
        if name not in weights:
            raise LlamaMinError(f"{ckpt}: no weights for '{name}' (saved by a different run setup?)")
    return state, weights, extra


def apply_checkpoint(loaded: tuple, named: list, opt, device) -> None:
    """Copy a read checkpoint into the (possibly sharded) model, the AdamW state and this rank's RNG."""
    state, weights, extra = loaded
    with torch.no_grad():
        for name, p in named:
            p.copy_(like(p, weights[name]))
            prefix = name + "."
            keys = [k for k in extra if k.startswith(prefix) and "." not in k[len(prefix):]]
            if keys:
                opt.state[p] = {k[len(prefix):]: extra[k].clone() if extra[k].ndim == 0 else like(p, extra[k])
                                for k in keys}
    if state.get("world_size") == Dist.world and f"rng.cpu.{Dist.rank}" in extra:
        torch.set_rng_state(extra[f"rng.cpu.{Dist.rank}"])
        if device.type == "cuda" and f"rng.cuda.{Dist.rank}" in extra:
            torch.cuda.set_rng_state(extra[f"rng.cuda.{Dist.rank}"], device)
    else:
        log(f"note: the checkpoint was written by {state.get('world_size')} processes, now {Dist.world}: "
            "RNG states (only dropout uses them) are reseeded")
        torch.manual_seed(state["step"] * 7919 + Dist.rank)
