"""RoPE in pictures: PNGs drawn from what llama_min's own RoPE functions compute.

    python -m llama_min.inspect.rope_viz --out img/                 # all pictures
    python -m llama_min.inspect.rope_viz --out img/ --only decay scaling
    python scripts/rope_viz.py                              # a checkout: redraw scripts/img/

Each picture has a pure data function (torch only, no matplotlib; tests/test_rope_viz.py checks them)
and a plot function. The pictures need matplotlib: pip install 'llama_min[viz]'.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import hf_to_meta_qk, meta_to_hf_qk
from ..files import atomic_write
from ..model import (
    ModelArgs,
    apply_rotary_emb,
    llama3_scale_frequencies,
    precompute_freqs_cis,
    rope_frequencies,
)

HD = 128  # head dim of every Llama 2/3 model


def thetas(base: float = 10000.0, hd: int = HD) -> torch.Tensor:
    """theta_i = base^(-2i/hd), exactly as the model computes them (float32, hd/2 values)."""
    return rope_frequencies(ModelArgs(dim=hd, n_heads=1, rope_theta=base))


def rotate(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Apply the model's RoPE to one head vector x (hd,) at each position: (P, hd)."""
    table = precompute_freqs_cis(freqs, int(positions.max()) + 1)[positions]  # (P, hd/2)
    xs = x.expand(len(positions), -1)[None, :, None, :]  # (B=1, T=P, heads=1, hd)
    out, _ = apply_rotary_emb(xs, xs, table)
    return out[0, :, 0]


# ----------------------------------------------------------------------------------------------
# Data behind the pictures (no matplotlib)
# ----------------------------------------------------------------------------------------------


def rotation_data(pairs=(0, 16, 32), n_pos: int = 32, base: float = 10000.0) -> dict:
    """Where pair i of a head vector whose pairs all start at 1+0j lands at positions 0..n_pos-1.

    Returns {i: complex tensor (n_pos,)}: the point x[2i] + j x[2i+1] after RoPE at each position.
    """
    x = torch.tensor([1.0, 0.0]).repeat(HD // 2)  # every pair = 1 + 0j
    rotated = rotate(x, torch.arange(n_pos), thetas(base))
    return {i: torch.complex(rotated[:, 2 * i], rotated[:, 2 * i + 1]) for i in pairs}


def angle_table(n_pos: int = 256, base: float = 10000.0) -> torch.Tensor:
    """cos(m * theta_i) = Re freqs_cis[m, i], shape (n_pos, hd/2)."""
    return precompute_freqs_cis(thetas(base), n_pos).real


def sinusoidal_embedding(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The original Transformer's absolute embedding: (sin m*theta_i, cos m*theta_i) per pair, (P, hd).

    The same angles as RoPE, read off freqs_cis; but they are *added* to the vector, not multiplied.
    """
    table = precompute_freqs_cis(freqs, int(positions.max()) + 1)[positions]
    return torch.stack([table.imag, table.real], dim=-1).flatten(1)


def relative_scores(offset: int = 8, n_pos: int = 1024, hd: int = 64, seed: int = 0) -> dict:
    """Attention logit q.k/sqrt(hd) of one fixed query/key pair, key at m and query at m + offset.

    For every absolute m in 0..n_pos-1: "rope" rotates q and k by their positions (the model's RoPE);
    "sinusoidal" adds absolute sinusoidal embeddings to q and k instead; "none" has no positions.
    RoPE gives the same logit at every m; the sinusoidal one changes with m.
    """
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    freqs, m = thetas(10000.0, hd), torch.arange(n_pos)
    scale = math.sqrt(hd)
    rope = (rotate(q, m + offset, freqs) * rotate(k, m, freqs)).sum(-1) / scale
    pe_q, pe_k = sinusoidal_embedding(m + offset, freqs), sinusoidal_embedding(m, freqs)
    sinusoidal = ((q + pe_q) * (k + pe_k)).sum(-1) / scale
    return {"positions": m, "rope": rope, "sinusoidal": sinusoidal, "none": float(q @ k) / scale}


def decay_bound(max_dist: int = 65536, base: float = 10000.0) -> torch.Tensor:
    """RoFormer's long-term decay (Su et al. 2021, sec. 3.4.3): (1/(hd/2)) sum_J |S_J| at distance n.

    S_J = sum_{i<J} exp(j n theta_i) (j the imaginary unit) = cumulative sum of freqs_cis[n] over the
    pairs. Abel summation bounds |q . k| at distance n by max_i |h_{i+1} - h_i| * sum_J |S_J|, with
    h_i = q_i conj(k_i): the bound falls as the distance grows. Returns (max_dist,) for n = 0 .. max_dist-1.
    """
    table = precompute_freqs_cis(thetas(base), max_dist)  # (n, hd/2)
    return table.cumsum(dim=1).abs().mean(dim=1)


def scaling_data(base: float = 500000.0, factors=(8.0, 32.0), low: float = 1.0, high: float = 4.0,
                 orig: int = 8192) -> dict:
    """Llama 3.1+ theta_i' for each factor, next to theta_i, with the band limits in tokens."""
    freqs = thetas(base)
    scaled = {f: llama3_scale_frequencies(freqs, f, low, high, orig) for f in factors}
    return {"theta": freqs, "scaled": scaled, "keep_below": orig / high, "scale_above": orig / low}


def qk_row_order(hd: int = 8) -> dict:
    """Per head: which Meta row each Hugging Face row holds, and back (from the converters).

    "hf_holds_meta"[r] = the Meta (interleaved) row stored at HF row r;
    "meta_holds_hf"[r] = the HF row that hf_to_meta_qk puts at Meta row r.
    """
    rows = torch.arange(hd, dtype=torch.float32)[:, None]
    hf_holds_meta = meta_to_hf_qk(rows, 1)[:, 0].long()
    meta_holds_hf = hf_to_meta_qk(rows, 1)[:, 0].long()
    return {"hf_holds_meta": hf_holds_meta.tolist(), "meta_holds_hf": meta_holds_hf.tolist()}


# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib, imported lazily)
# ----------------------------------------------------------------------------------------------


def _title(fig, title: str, caption: str):
    fig.suptitle(title, fontsize=13, fontweight="bold", y=0.985)
    fig.text(0.5, 0.915, caption, ha="center", va="top", fontsize=9.5, color="0.3", wrap=True)


def _save(fig, path: Path, dpi: int):
    """The layout every one-panel picture shares (room for the title and caption), then the file."""
    fig.subplots_adjust(top=0.83, bottom=0.11, left=0.08, right=0.98)
    fig.savefig(path, dpi=dpi)


def plot_rotation(plt, path: Path, dpi: int):
    n_pos = 16
    data, theta = rotation_data(n_pos=n_pos), thetas()
    fig, axes = plt.subplots(1, len(data), figsize=(12, 4.9))
    for ax, (i, z) in zip(axes, data.items()):
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, ls="--", color="0.75"))
        sc = ax.scatter(z.real, z.imag, c=range(n_pos), cmap="viridis", s=40, zorder=3, vmin=0, vmax=n_pos - 1)
        for m in range(min(3, n_pos - 1)):  # the first hops, along the circle
            ax.annotate("", xy=(z[m + 1].real, z[m + 1].imag), xytext=(z[m].real, z[m].imag), zorder=2,
                        arrowprops=dict(arrowstyle="->", color="0.35", connectionstyle="arc3,rad=0.25"))
        placed = []
        for m in (0, 1, 2, n_pos - 1):  # label a position unless its angle is already labelled
            ang = float(torch.angle(z[m]))
            if all(abs(math.remainder(ang - a, 2 * math.pi)) > 0.3 for a in placed):
                placed.append(ang)
                ax.text(1.2 * math.cos(ang), 1.2 * math.sin(ang), f"m={m}", ha="center", va="center", fontsize=8)
        speed = "fast" if i == 0 else ("slow" if i == max(data) else "medium")
        turns = n_pos * float(theta[i]) / (2 * math.pi)
        ax.set_title(f"pair i={i} ({speed}): θ_i = {theta[i]:.3g} rad/token\n"
                     f"{n_pos} positions = {turns:.2g} turns", fontsize=10)
        ax.set_xlim(-1.35, 1.35), ax.set_ylim(-1.35, 1.35), ax.set_aspect("equal")
        ax.set_xlabel("x[2i]  (real part)")
    axes[0].set_ylabel("x[2i+1]  (imaginary part)")
    fig.subplots_adjust(top=0.74, bottom=0.11, left=0.06, right=0.9, wspace=0.2)
    cax = fig.add_axes((0.92, 0.16, 0.012, 0.52))
    fig.colorbar(sc, cax=cax, label="position m")
    _title(fig, "RoPE turns each feature pair by m·θ_i",
           f"Pair i of a head vector is one complex number z_i = x[2i] + j·x[2i+1]; at position m it is multiplied "
           f"by exp(j·m·θ_i),\nθ_i = 10000^(-2i/{HD}). Here every z_i starts at 1 (m = 0): early pairs spin, late "
           "pairs barely move. Lengths never change.")
    fig.savefig(path, dpi=dpi)


def plot_angles(plt, path: Path, dpi: int):
    n_pos, table = 256, angle_table(256)
    fig, ax = plt.subplots(figsize=(10, 5))
    im = ax.imshow(table.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1,
                   interpolation="nearest", extent=(-0.5, n_pos - 0.5, -0.5, HD // 2 - 0.5))
    fig.colorbar(im, ax=ax, label="cos(m·θ_i) = Re freqs_cis[m, i]")
    ax.set_xlabel("position m"), ax.set_ylabel(f"pair index i (0 .. {HD // 2 - 1})")
    ax.text(n_pos * 0.98, 3, "fast pairs: stripes a few tokens wide\n(tell neighbours apart)", ha="right",
            fontsize=9, bbox=dict(fc="white", alpha=0.85, ec="none"))
    ax.text(n_pos * 0.98, HD // 2 - 8, "slow pairs: barely turn over this window\n(keep far positions apart)",
            ha="right", fontsize=9, bbox=dict(fc="white", alpha=0.85, ec="none"))
    _title(fig, "The rotation angles m·θ_i (freqs_cis)",
           f"θ_i = 10000^(-2i/{HD}): wavelengths from 2π ≈ 6 tokens (i=0) to ≈ 54,000 tokens (i={HD // 2 - 1}). "
           "One table for every layer and head.")
    _save(fig, path, dpi)


def plot_relative(plt, path: Path, dpi: int):
    offset = 8
    d = relative_scores(offset=offset)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    m = d["positions"]
    ax.plot(m, d["sinusoidal"], color="tab:orange", lw=1.2,
            label=f"absolute sinusoidal, added: (q + p(m+{offset})) · (k + p(m))")
    ax.plot(m, d["rope"], color="tab:blue", lw=2.2, label=f"RoPE: rotate(q, m+{offset}) · rotate(k, m)")
    ax.axhline(d["none"], color="0.5", ls=":", lw=1.2, label="no positions: q · k")
    spread = (d["rope"].max() - d["rope"].min()).item()
    ax.set_xlabel(f"absolute position m of the key (the query sits at m + {offset})")
    ax.set_ylabel("attention logit  q·k / √hd")
    ax.legend(loc="upper right", fontsize=9, framealpha=0.95, ncol=2)
    lo = min(d["rope"].min().item(), d["none"], d["sinusoidal"].min().item())
    ax.set_xlim(0, len(m) - 1), ax.set_ylim(lo - 0.5, d["sinusoidal"].max().item() + 2.0)  # room for the legend
    _title(fig, "RoPE scores depend only on the distance, not on where the pair sits",
           f"One fixed query/key pair (hd = 64, random), always {offset} tokens apart, slid along the sequence.\n"
           f"RoPE: one flat line (spread {spread:.0e}: float32 rounding). Added sinusoidal embeddings: the logit "
           "changes with the absolute position.")
    _save(fig, path, dpi)


def log_smooth(y: torch.Tensor, points: int = 200, width: float = 1.15):
    """Mean of y[n] for n in [c/width, c*width] at log-spaced integer centres c (the trend under the wiggles)."""
    centres = torch.logspace(0, math.log10(len(y) - 1), points).round().long().unique()
    means = [y[math.ceil(c / width) : math.floor(c * width) + 1].mean() for c in centres.tolist()]
    return centres, torch.stack(means)


def plot_decay(plt, path: Path, dpi: int):
    fig, ax = plt.subplots(figsize=(10, 4.8))
    n_max = 65536
    n = torch.arange(n_max)
    for base, color, who in [(10000.0, "tab:blue", "Llama 1/2"), (500000.0, "tab:red", "Llama 3")]:
        bound = decay_bound(n_max, base)
        ax.plot(n[1:], bound[1:], color=color, lw=0.4, alpha=0.35)
        ax.plot(*log_smooth(bound), color=color, lw=2.2, label=f"base {base:,.0f} ({who})")
    ax.set_xscale("log")
    ax.set_xlabel("relative distance n between query and key (tokens, log scale)")
    ax.set_ylabel("relative upper bound  (1/(hd/2)) Σ_J |S_J|")
    ax.set_xlim(1, n_max - 1), ax.set_ylim(0, None)
    ax.legend(loc="upper right", fontsize=9, title="thin: exact, thick: local mean", title_fontsize=8)
    ax.grid(alpha=0.3, which="major")
    _title(fig, "Long-range decay: the bound on q·k shrinks with distance",
           f"RoFormer's bound (Su et al. 2021, sec. 3.4.3), hd = {HD}: S_J = Σ_(i<J) exp(j·n·θ_i), read off "
           "freqs_cis[n].\nA larger base turns the pairs slower, so the decay is stretched over longer distances.")
    _save(fig, path, dpi)


def plot_scaling(plt, path: Path, dpi: int):
    d = scaling_data()
    i = torch.arange(len(d["theta"]))
    wave = lambda t: 2 * math.pi / t  # noqa: E731
    w0 = wave(d["theta"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True, height_ratios=(2, 1))
    keep_end = int((w0 < d["keep_below"]).sum())  # pairs are ordered by wavelength
    scale_start = int((w0 <= d["scale_above"]).sum())
    for ax in (ax1, ax2):
        ax.axvspan(-0.5, keep_end - 0.5, color="tab:green", alpha=0.10)
        ax.axvspan(keep_end - 0.5, scale_start - 0.5, color="tab:orange", alpha=0.15)
        ax.axvspan(scale_start - 0.5, len(i) - 0.5, color="tab:purple", alpha=0.10)
    ax1.plot(i, w0, "k.-", lw=1, ms=4, label=f"original θ_i = 500000^(-2i/{HD})")
    for (f, t), c in zip(d["scaled"].items(), ["tab:blue", "tab:red"]):
        ax1.plot(i, wave(t), ".-", color=c, lw=1, ms=3, label=f"scaled, factor {f:g}")
        ax2.plot(i, t / d["theta"], ".-", color=c, lw=1, ms=3, label=f"factor {f:g}")
    ax1.axhline(d["keep_below"], color="0.4", ls="--", lw=0.8)
    ax1.axhline(d["scale_above"], color="0.4", ls="--", lw=0.8)
    ax1.text(1, d["keep_below"] * 1.3, "orig/high = 2048 tokens", fontsize=8, color="0.3")
    ax1.text(1, d["scale_above"] * 1.3, "orig/low = 8192 tokens", fontsize=8, color="0.3")
    ax1.set_yscale("log"), ax1.set_ylabel("wavelength 2π/θ_i (tokens)")
    ax1.legend(loc="upper left", fontsize=9, bbox_to_anchor=(0.0, 0.85))
    y = ax1.get_ylim()[1] / 3
    for x, name in [(keep_end / 2, "kept"), ((keep_end + scale_start) / 2, "blended"),
                    ((scale_start + len(i)) / 2, "slowed by factor")]:
        ax1.text(x, y, name, ha="center", fontsize=10, fontweight="bold", color="0.25")
    ax2.set_yscale("log"), ax2.set_ylabel("θ_i' / θ_i"), ax2.set_xlabel(f"pair index i (hd = {HD})")
    ax2.legend(loc="lower left", fontsize=9)
    _title(fig, "Llama 3.1+ RoPE scaling (llama3_scale_frequencies)",
           "Pairs whose turn takes under 2048 tokens are kept; pairs slower than 8192 tokens (the original "
           "context) turn\n8× (Llama 3.1/3.3) or 32× (Llama 3.2 1B/3B) slower; in between, a blend. "
           "Read the factor from the checkpoint.")
    fig.subplots_adjust(top=0.86, bottom=0.09, left=0.09, right=0.98, hspace=0.08)
    fig.savefig(path, dpi=dpi)


def plot_qk_order(plt, path: Path, dpi: int):
    hd, order = 8, qk_row_order(8)
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(10, 5.2))
    xm, xh, h = 0.0, 6.0, 0.8
    for r in range(hd):
        pair_m, part = divmod(r, 2)  # Meta: row 2i+j is pair i, j = 0 real / 1 imaginary
        ax.add_patch(plt.Rectangle((xm, -r - h / 2), 2.2, h, color=colors[pair_m], alpha=0.35 + 0.35 * part))
        ax.text(xm + 1.1, -r, f"row {r}: pair {pair_m} {'re' if part == 0 else 'im'}", ha="center", va="center",
                fontsize=9)
        src = order["hf_holds_meta"][r]  # HF row r holds Meta row src
        pair_h, part_h = divmod(src, 2)
        ax.add_patch(plt.Rectangle((xh, -r - h / 2), 2.6, h, color=colors[pair_h], alpha=0.35 + 0.35 * part_h))
        ax.text(xh + 1.3, -r, f"row {r}: pair {pair_h} {'re' if part_h == 0 else 'im'}  (= Meta row {src})",
                ha="center", va="center", fontsize=9)
        ax.annotate("", xy=(xm + 2.25, -src), xytext=(xh - 0.05, -r),
                    arrowprops=dict(arrowstyle="->", color=colors[pair_h], lw=1.4))
    ax.text(xm + 1.1, 0.9, "Meta / llama_min / GGUF\ninterleaved: pair i = rows (2i, 2i+1)", ha="center",
            fontsize=10, fontweight="bold")
    ax.text(xh + 1.3, 0.9, f"Hugging Face\nrotate-half: pair i = rows (i, i+{hd // 2})", ha="center",
            fontsize=10, fontweight="bold")
    ax.text((xm + xh + 2.2) / 2, -hd + 0.1, "hf_to_meta_qk: HF row → Meta row\n(meta_to_hf_qk goes back)",
            ha="center", fontsize=9, color="0.3")
    ax.set_xlim(-0.3, 8.9), ax.set_ylim(-hd + 0.2, 1.9), ax.axis("off")
    _title(fig, "q/k row order inside one head (hd = 8): Meta vs Hugging Face",
           "Same weights, rows reordered inside each head: HF row j·hd/2 + i holds Meta row 2i + j "
           "(j = 0 re, 1 im).\n"
           "Loading HF weights into the complex-pair RoPE needs this un-permute of wq and wk, per head "
           "(K heads for wk).")
    fig.subplots_adjust(top=0.84, bottom=0.02, left=0.02, right=0.98)
    fig.savefig(path, dpi=dpi)


PICTURES = {  # name -> (file name, plot function, what it shows)
    "rotation": ("rope_rotation.png", plot_rotation, "a fast, a medium and a slow pair turning with position"),
    "angles": ("rope_angles.png", plot_angles, "cos(m*theta_i) over positions x pairs (the freqs_cis table)"),
    "relative": ("rope_relative.png", plot_relative, "RoPE logits depend on distance only; sinusoidal ones don't"),
    "decay": ("rope_decay.png", plot_decay, "RoFormer's long-range decay bound, base 10000 vs 500000"),
    "scaling": ("rope_scaling.png", plot_scaling, "Llama 3.1+ frequency scaling, factor 8 and 32"),
    "qk_order": ("rope_qk_order.png", plot_qk_order, "Meta's interleaved vs HF's rotate-half q/k row order"),
}


def draw(names, out: Path, dpi: int = 100) -> list:
    """Draw the named pictures (default: all) into `out`, each written atomically; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or PICTURES:
        file_name, plot, _ = PICTURES[name]

        def write(tmp: str, plot=plot) -> None:
            plot(plt, tmp, dpi)  # matplotlib picks the format from the name: keep it .png
            plt.close("all")

        paths.append(atomic_write(out / file_name, lambda tmp, write=write: _as_png(tmp, write)))
    return paths


def _as_png(tmp: str, write) -> None:
    """Draw into `tmp` although its name does not end in .png (atomic_write's temp name)."""
    png = tmp + ".png"
    try:
        write(png)
        Path(png).replace(tmp)
    finally:
        Path(png).unlink(missing_ok=True)


def main(argv=None, default_out: Optional[Path] = None) -> int:
    """Command line: --out DIR (required unless `default_out` is given), --only NAME..., --dpi N."""
    parser = argparse.ArgumentParser(
        description="Draw RoPE pictures (PNG) from llama_min's own RoPE functions. Needs matplotlib "
        "(pip install 'llama_min[viz]').",
        epilog="pictures:\n" + "\n".join(f"  {n:9s} {f:19s} {what}" for n, (f, _, what) in PICTURES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=default_out, required=default_out is None,
                        help="output folder" + (f" (default: {default_out})" if default_out else ""))
    parser.add_argument("--only", nargs="+", choices=list(PICTURES), metavar="NAME",
                        help="draw only these pictures (default: all)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default: 100)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: rope_viz needs matplotlib: pip install 'llama_min[viz]'", file=sys.stderr)
        return 2
    for path in draw(args.only, args.out, args.dpi):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
