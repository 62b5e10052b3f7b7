"""Past the trained window: the next-token loss by position under each RoPE scaling, measured and drawn.

    python scripts/long_context_viz.py measure --ckpt CKPT --text FILE --out runs/lc.npz --trained-window 256
    python scripts/long_context_viz.py draw runs/lc.npz --out scripts/img/long_context_mini.png

measure: the checkpoint's ModelArgs copied once per scaling (`scaled_args`: none, linear x4, dynamic NTK x4,
yarn x4 by default) and built on the same state dict, float32, model.py as written. Windows of L = 4x the
trained window W are cut from the text; each is run from position 0 in one forward (no cache), and the
negative log-likelihood of the next token at every position p = 0 .. L-2 is averaged over the windows.
The result (one NLL curve per scaling + the settings) is saved to an .npz, with a .json summary beside it
(perplexity per band [kW, (k+1)W) of positions).

draw: from the saved .npz files alone (numpy + matplotlib; torch is never imported on this path), perplexity
against position, one curve per scaling, averaged over bins of positions, the trained window marked.

Numbers need torch (imported inside the functions that compute them); pictures need matplotlib
(pip install 'llama_min[viz]'), imported lazily.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import LlamaMinError
from ..files import atomic_write, read_npz

DEFAULT_SCALINGS = ("none", "linear:4", "dynamic:4", "yarn:4")
NAMES = {"none": "none", "linear": "linear", "dynamic": "dynamic NTK", "yarn": "YaRN", "llama3": "llama3"}
STORED = "ckpt"  # the scaling spec that keeps the checkpoint's own RoPE settings (e.g. after a fine-tune)
NPZ_KEYS = ("labels", "nll", "trained_window", "settings")


# ----------------------------------------------------------------------------------------------
# Scalings
# ----------------------------------------------------------------------------------------------


def parse_scaling(spec: str) -> tuple:
    """'none' | 'ckpt' | 'KIND:FACTOR' (KIND linear, dynamic, yarn, llama3) -> (kind or spec, factor or None)."""
    if spec in ("none", STORED):
        return spec, None
    kind, _, factor = spec.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = -1.0
    if kind not in NAMES or kind == "none" or not value > 0:
        raise LlamaMinError(f"scaling {spec!r}: expected none, {STORED} or KIND:FACTOR with KIND one of "
                            "linear, dynamic, yarn, llama3 and FACTOR > 0 (e.g. linear:4)")
    return kind, value


def scaling_label(spec: str, args=None) -> str:
    """'linear x4', 'YaRN x4', 'none'; `ckpt` names the checkpoint's own scaling when `args` is given."""
    kind, factor = parse_scaling(spec)
    if kind == STORED:
        own = getattr(args, "rope_scaling_type", None)
        return "as stored" + (f" ({NAMES[own]} x{args.rope_scaling_factor:g})" if own else "")
    return NAMES[kind] if factor is None else f"{NAMES[kind]} x{factor:g}"


def scaled_args(args, spec: str, trained_window: int, length: int):
    """A copy of `args` (dataclasses.replace) with the RoPE scaling `spec` and a table reaching `length`.

    The scaling replaces whatever the checkpoint had (but `ckpt`, which keeps it); `trained_window` is the
    window it stretches (dynamic's M, yarn's and llama3's L0). max_seq_len is raised to `length` so that the
    RoPE table (2 x max_seq_len rows) covers every position.
    """
    from dataclasses import replace

    kind, factor = parse_scaling(spec)
    window = {"max_seq_len": max(args.max_seq_len, length)}
    if kind == STORED:
        return replace(args, **window)
    if kind == "none":
        return replace(args, rope_scaling_type=None, use_scaled_rope=False, **window)
    return replace(args, rope_scaling_type=kind, use_scaled_rope=kind == "llama3", rope_scaling_factor=factor,
                   rope_original_max_pos=trained_window, **window)


# ----------------------------------------------------------------------------------------------
# NLL by position (torch)
# ----------------------------------------------------------------------------------------------


def token_windows(tokens: list, length: int, count: int, from_end: bool = False):
    """`count` consecutive non-overlapping windows of `length` tokens, (count, length) int64: from the first
    token, or (from_end) ending at the last one (a training run holds out the end of its text)."""
    import torch

    need = length * count
    if len(tokens) < need:
        raise LlamaMinError(f"the text has {len(tokens)} tokens, fewer than {count} windows of {length}")
    picked = tokens[len(tokens) - need:] if from_end else tokens[:need]
    return torch.tensor(picked, dtype=torch.long).view(count, length)


def final_hidden(model, tokens):
    """model(tokens) run as written, returning what its last block outputs (B, T, D), before the final norm.

    A forward hook on the last block reads it; the model itself runs with last_only=True, so the (T, V)
    logits of a long window are never held in memory at once (nll_by_position projects them in chunks).
    """
    import torch

    seen = {}
    handle = model.layers[-1].register_forward_hook(lambda module, inputs, output: seen.update(h=output))
    try:
        with torch.inference_mode():
            model(tokens, last_only=True)
    finally:
        handle.remove()
    return seen["h"]


def nll_by_position(model, windows, chunk: int = 1024) -> np.ndarray:
    """NLL (float64) of each window's next token at every position: (n, L-1), [w, p] = -log P(x[p+1] | x[..p]).

    Each window runs alone from position 0, one forward, no cache; the output projection and log-softmax
    are applied `chunk` positions at a time.
    """
    import torch

    rows = []
    for window in windows:
        h = final_hidden(model, window[None])[0, :-1]  # (L-1, D): position p predicts token p+1
        targets = window[1:]
        parts = []
        with torch.inference_mode():
            for a in range(0, h.shape[0], chunk):
                logits = model.output(model.norm(h[a:a + chunk])).float()  # (c, V), as the model returns them
                picked = logits.gather(1, targets[a:a + chunk, None])[:, 0]
                parts.append(torch.logsumexp(logits, dim=1) - picked)
        rows.append(torch.cat(parts).double().numpy())
    return np.stack(rows)


def load_tokens(tokenizer, text: str, need: int, from_end: bool = False) -> list:
    """At least `need` tokens of `text` (no BOS/EOS), encoding only as much of its start (or end) as needed."""
    chars = max(need * 4, 4096)
    while True:
        part = text[-chars:] if from_end else text[:chars]
        tokens = tokenizer.encode(part, bos=False, eos=False)
        if len(tokens) >= need or len(part) == len(text):
            return tokens
        chars *= 2


def measure(ckpt, text_path, trained_window: Optional[int] = None, multiple: int = 4, windows: int = 8,
            scalings=DEFAULT_SCALINGS, from_end: bool = False, tag: str = "", progress=print) -> dict:
    """NLL by position for each scaling of one checkpoint on one text: the dict `save` writes.

    trained_window W: the checkpoint's (its file's context length) unless given; windows are L = multiple x W.
    """
    import torch

    from ..checkpoint import build_transformer, load_checkpoint
    from ..text.tokenizer import load_tokenizer

    args, state_dict = load_checkpoint(ckpt)
    state_dict = {k: v.float() for k, v in state_dict.items()}
    trained = trained_window or args.trained_window or args.max_seq_len
    length = multiple * trained
    text = Path(text_path).read_text(encoding="utf-8")
    tokens = load_tokens(load_tokenizer(ckpt), text, length * windows, from_end)
    batch = token_windows(tokens, length, windows, from_end)
    labels, curves, seconds = [], [], []
    for spec in scalings:
        model = build_transformer(scaled_args(args, spec, trained, length), state_dict, dtype=torch.float32)
        start = time.perf_counter()
        curves.append(nll_by_position(model.eval(), batch).mean(axis=0))
        seconds.append(round(time.perf_counter() - start, 1))
        labels.append(scaling_label(spec, args))
        progress(f"{labels[-1]}: {seconds[-1]} s, perplexity inside the window "
                 f"{math.exp(curves[-1][:trained - 1].mean()):.2f}, past it {math.exp(curves[-1][trained:].mean()):.2f}")
        del model
    settings = {"ckpt": str(ckpt), "text": str(text_path), "trained_window": trained, "length": length,
                "windows": windows, "from_end": from_end, "scalings": list(scalings), "tag": tag,
                "seconds_per_scaling": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__}
    return {"labels": labels, "nll": np.stack(curves), "trained_window": trained, "settings": settings}


# ----------------------------------------------------------------------------------------------
# Saved numbers (numpy only)
# ----------------------------------------------------------------------------------------------


def save(path, result: dict) -> Path:
    """Write `result` to `path` (.npz: labels, nll float32, trained_window, settings as JSON text) and the
    summary beside it (same name, .json); returns the .npz path."""
    path = Path(path)
    arrays = {"labels": np.array(result["labels"], dtype=str), "nll": np.asarray(result["nll"], np.float32),
              "trained_window": np.array(result["trained_window"]),
              "settings": np.array(json.dumps(result["settings"]))}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)
    loaded = load(path)
    summary = {"settings": loaded["settings"], "bands": band_perplexity(loaded)}
    atomic_write(path.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    return path


def load(path) -> dict:
    """The saved result back: labels (list of str), nll (C, L-1) float32, trained_window (int), settings (dict).
    Never unpickles (allow_pickle=False); a LlamaMinError names a file that is not one of ours."""
    data = read_npz(path, NPZ_KEYS, "a long-context .npz")
    return {"labels": [str(s) for s in data["labels"]], "nll": data["nll"],
            "trained_window": int(data["trained_window"]), "settings": json.loads(str(data["settings"]))}


def band_perplexity(data: dict) -> dict:
    """{label: [perplexity over positions [kW, (k+1)W) for k = 0, 1, ...]}, W the trained window."""
    W, out = data["trained_window"], {}
    for label, nll in zip(data["labels"], data["nll"]):
        out[label] = [round(math.exp(float(nll[a:a + W].mean())), 3) for a in range(0, len(nll), W)]
    return out


def binned(nll: np.ndarray, width: int) -> tuple:
    """(centres, perplexity): exp of the mean NLL over consecutive bins of `width` positions."""
    n = len(nll) // width * width
    means = nll[:n].reshape(-1, width).mean(axis=1)
    return np.arange(len(means)) * width + (width - 1) / 2, np.exp(means)


# ----------------------------------------------------------------------------------------------
# Picture (matplotlib, imported lazily)
# ----------------------------------------------------------------------------------------------


def draw(paths, out, width: Optional[int] = None, title: Optional[str] = None, dpi: int = 100) -> Path:
    """One PNG from the saved files alone: perplexity by position (bins of `width`, default L/64), one curve
    per scaling per file, labels prefixed by each file's tag; the first file's trained window marked."""
    try:
        import matplotlib
    except ImportError:
        raise LlamaMinError("drawing needs matplotlib: pip install 'llama_min[viz]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [load(p) for p in paths]
    first = datasets[0]
    W, L = first["trained_window"], first["nll"].shape[1] + 1
    width = width or max(1, L // 64)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    styles = iter([("-", 2.0), ("--", 2.0), (":", 2.4)] * 4)
    for data in datasets:
        line, lw = next(styles)
        tag = data["settings"].get("tag", "")
        for label, nll in zip(data["labels"], data["nll"]):
            ax.plot(*binned(nll, width), line, lw=lw, label=f"{tag}: {label}" if tag else label)
    ax.axvspan(W, L, color="0.9", zorder=0)
    ax.axvline(W, color="0.3", ls="--", lw=1)
    ax.text(W, 0.97, f"trained window {W:,}  ", transform=ax.get_xaxis_transform(), ha="right", va="top", fontsize=9)
    ax.set_yscale("log"), ax.set_xlim(0, L)
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain), ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel(f"perplexity (exp mean NLL, {width}-token bins)")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (high / low) ** 0.3)  # head room: the legend sits above the curves
    ax.legend(loc="upper right", ncol=3, fontsize=9, framealpha=0.95)
    ax.grid(alpha=0.3, which="both")
    s = first["settings"]
    fig.suptitle(title or f"Past the trained window: {Path(s['ckpt']).name}", fontsize=13, fontweight="bold")
    fig.text(0.5, 0.915, f"Next-token perplexity at each position, mean over {s['windows']} window(s) of {L:,} "
             f"tokens of {Path(s['text']).name}, each run in one forward from position 0.\nOne curve per RoPE "
             "scaling, all on the same weights (x4 stretches the trained window to the whole plot).",
             ha="center", va="top", fontsize=9.5, color="0.3")
    fig.subplots_adjust(top=0.82, bottom=0.11, left=0.08, right=0.98)
    out = Path(out)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)

    try:
        return atomic_write(out, write)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="NLL by position past the trained window, per RoPE scaling: "
                                "measure (saves .npz + .json) and draw (from the saved files alone).")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="compute NLL by position for each scaling and save it")
    m.add_argument("--ckpt", required=True, help="any checkpoint load_checkpoint reads")
    m.add_argument("--text", required=True, type=Path, help="a long UTF-8 text")
    m.add_argument("--out", required=True, type=Path, help="the .npz to write (a .json summary goes beside it)")
    m.add_argument("--trained-window", type=int, help="W (default: the checkpoint's context length)")
    m.add_argument("--multiple", type=int, default=4, help="windows of L = MULTIPLE x W tokens (default 4)")
    m.add_argument("--windows", type=int, default=8, help="windows averaged over (default 8)")
    m.add_argument("--scalings", nargs="+", default=list(DEFAULT_SCALINGS),
                   help=f"none | {STORED} (the checkpoint's own) | KIND:FACTOR (default: %(default)s)")
    m.add_argument("--from-end", action="store_true", help="take the windows from the end of the text")
    m.add_argument("--tag", default="", help="a name for this run, prefixed to its curves' labels")
    m.add_argument("--threads", type=int, help="torch CPU threads")
    d = sub.add_parser("draw", help="draw one PNG from saved .npz files")
    d.add_argument("npz", nargs="+", type=Path)
    d.add_argument("--out", required=True, type=Path, help="the .png to write")
    d.add_argument("--bin", type=int, help="positions per bin (default L/64)")
    d.add_argument("--title")
    d.add_argument("--dpi", type=int, default=100)
    return p


def main(argv=None) -> int:
    """The command (scripts/long_context_viz.py runs it under cli.common.run_main, which turns an error into
    one `error:` line and its exit code)."""
    args = parser().parse_args(argv)
    if args.command == "measure":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for spec in args.scalings:
            parse_scaling(spec)  # a bad spec stops before the checkpoint is read
        result = measure(args.ckpt, args.text, args.trained_window, args.multiple, args.windows, args.scalings,
                         args.from_end, args.tag, progress=lambda line: print(line, file=sys.stderr))
        print(save(args.out, result))
    else:
        print(draw(args.npz, args.out, args.bin, args.title, args.dpi))
    return 0
