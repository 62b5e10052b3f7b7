"""The pictures of `llama-min inspect`, drawn from an inspect.npz alone (llama_min/inspect/internals.py writes it).

  inspect_attention.png   attention maps of a few heads (the clearest previous-token, first-token and broad
                          heads, or the ones asked for), the prompt's tokens on both axes
  inspect_distance.png    attention mass against relative distance for every layer and head, beside three
                          scores per head: on the previous token, on the first token, spread (entropy)
  inspect_rope_pairs.png  the length of each RoPE pair of q and k, per layer, against the pair's wavelength
  inspect_logit_lens.png  the top next token read from the residual stream after each block, by probability

No torch here: numpy and (lazily) matplotlib. The pictures need matplotlib: pip install 'llama_min[viz]'.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EnvironmentFailure
from ..files import atomic_write, read_npz

INSTALL_HINT = "pip install 'llama_min[viz]'"


NPZ_KEYS = ("tokens", "token_text", "attention", "distance_mass", "rope_pair_q_norm", "rope_pair_k_norm",
            "rope_wavelength", "trained_window", "logit_lens_top", "logit_lens_prob", "logit_lens_text")


def load_npz(path) -> dict:
    """The arrays of an inspect.npz (never unpickles: allow_pickle=False); a LlamaMinError if one is missing."""
    return read_npz(path, NPZ_KEYS, "an inspect.npz of llama-min inspect")


# ---------------------------------------------------------------------------------------------------------
# Per-head scores and summaries (numpy only: the README's numbers and the choice of heads come from these)
# ---------------------------------------------------------------------------------------------------------


def head_scores(data: dict) -> dict:
    """Three (L, H) scores per head, averaged over query positions t >= 1 (t = 0 can only see itself):

    previous  attention[t, t-1]                                (mass on the token just before)
    first     attention[t, 0]                                  (mass on the first token: a "sink")
    spread    -sum_s a[t, s] log a[t, s] / log(t + 1)          (entropy, 1 = uniform over the t+1 visible)
    """
    att = data["attention"]  # (L, H, T, T)
    T = att.shape[-1]
    if T < 2:
        zeros = np.zeros(att.shape[:2])
        return dict(previous=zeros, first=zeros, spread=zeros)
    rows = att[:, :, 1:, :]  # (L, H, T-1, T): queries t = 1 .. T-1
    entropy = -(rows * np.log(np.clip(rows, 1e-30, None))).sum(-1)  # (L, H, T-1)
    return dict(previous=data["distance_mass"][:, :, 1], first=rows[..., 0].mean(-1),
                spread=(entropy / np.log(np.arange(2, T + 1))).mean(-1))


def choose_heads(data: dict, per_kind: int = 2) -> list:
    """[(layer, head, kind)]: the `per_kind` strongest heads of each score of head_scores, no head twice."""
    chosen, taken = [], set()
    for kind, score in head_scores(data).items():
        for flat in np.argsort(-score, axis=None):
            if len([c for c in chosen if c[2] == kind]) == per_kind:
                break
            lh = tuple(int(i) for i in np.unravel_index(flat, score.shape))
            if lh not in taken:
                taken.add(lh)
                chosen.append((*lh, kind))
    return chosen


def slow_share(pair_norm: np.ndarray, fraction: float = 0.25) -> float:
    """Share of the summed pair lengths (all layers and heads) in the slowest `fraction` of the pairs.

    Pairs are ordered fastest (i = 0) to slowest (i = hd/2 - 1); a model using all pairs alike gives `fraction`.
    """
    per_pair = pair_norm.reshape(-1, pair_norm.shape[-1]).sum(0)  # (hd/2,)
    n_slow = max(1, round(len(per_pair) * fraction))
    return float(per_pair[-n_slow:].sum() / per_pair.sum())


def summary(data: dict) -> dict:
    """The numbers the README quotes, measured from the npz."""
    scores = head_scores(data)
    L, H = scores["first"].shape
    top, tokens = data["logit_lens_top"], data["tokens"]
    hits = top[:, :-1] == tokens[None, 1:]  # (L+1, T-1): the lens names the prompt's actual next token
    return dict(layers=L, heads=H, tokens=len(tokens),
                sink_heads=int((scores["first"] > 0.5).sum()), previous_heads=int((scores["previous"] > 0.5).sum()),
                broad_heads=int((scores["spread"] > 0.7).sum()),
                q_slow_quarter=slow_share(data["rope_pair_q_norm"]),
                k_slow_quarter=slow_share(data["rope_pair_k_norm"]),
                first_layer_hits=int(np.argmax(hits.any(1))) if hits.any() else -1,
                final_hits=int(hits[-1].sum()), hits_by_layer=hits.sum(1).tolist(),
                final_mean_prob=float(data["logit_lens_prob"][-1].mean()))


# ---------------------------------------------------------------------------------------------------------
# The pictures: each plot_* takes (plt, data, path, dpi)
# ---------------------------------------------------------------------------------------------------------

KIND_WORDS = {"previous": "previous-token", "first": "first-token (sink)", "spread": "broad"}


def _label_tokens(ax, labels, axis: str, every: int) -> None:
    ticks = np.arange(0, len(labels), every)
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)


def plot_attention(plt, data: dict, path, dpi: int, heads: Optional[list] = None) -> None:
    """A grid of attention maps: row t (query) = how token t spreads its attention over tokens s <= t."""
    labels = list(data["token_text"])
    chosen = heads or choose_heads(data)
    scores = head_scores(data)
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    every = max(1, len(labels) // 40)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 1, 5.5 * rows + 0.8), squeeze=False,
                             layout="constrained")
    for ax, (layer, head, *kind) in zip(axes.flat, chosen):
        image = ax.imshow(data["attention"][layer, head], cmap="viridis", vmin=0, vmax=1)
        what = KIND_WORDS[kind[0]] + ": " if kind else ""
        ax.set_title(f"layer {layer}, head {head}\n{what}previous {scores['previous'][layer, head]:.0%}, "
                     f"first {scores['first'][layer, head]:.0%}, spread {scores['spread'][layer, head]:.2f}",
                     fontsize=10)
        _label_tokens(ax, labels, "x", every)
        _label_tokens(ax, labels, "y", every)
        ax.set_xlabel("key: the token attended to", fontsize=8)
        if ax in axes[:, 0]:
            ax.set_ylabel("query: the token attending", fontsize=8)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle("Attention maps: row t is where token t looks (each row sums to 1; the upper triangle is the "
                 "masked future)", fontsize=12)
    fig.savefig(path, dpi=dpi)


def plot_distance(plt, data: dict, path, dpi: int) -> None:
    """Heat map (L*H rows, T distances) of distance_mass, with the three head scores beside it."""
    from matplotlib.colors import LogNorm

    mass = data["distance_mass"]  # (L, H, T)
    L, H, T = mass.shape
    scores = head_scores(data)
    side = np.stack([scores[k].reshape(-1) for k in KIND_WORDS], axis=1)  # (L*H, 3)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, max(5, 0.045 * L * H + 2)), layout="constrained",
                                  gridspec_kw=dict(width_ratios=[5, 1.2]))
    image = ax.imshow(np.clip(mass.reshape(L * H, T), 1e-4, 1), aspect="auto", cmap="magma",
                      norm=LogNorm(1e-3, 1), interpolation="nearest")
    for boundary in range(H, L * H, H):
        ax.axhline(boundary - 0.5, color="white", lw=0.3)
    step = max(1, L // 15)
    ax.set_yticks(np.arange(0, L, step) * H + (H - 1) / 2, [f"layer {i}" for i in range(0, L, step)], fontsize=8)
    ax.set_xlabel("relative distance d = t - s (tokens back from the query)")
    ax.set_title(f"Mean attention on the token d back ({L} layers x {H} heads, one row per head)", fontsize=10)
    fig.colorbar(image, ax=ax, label="attention mass (log scale)", pad=0.01)
    side_image = ax2.imshow(side, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for boundary in range(H, L * H, H):
        ax2.axhline(boundary - 0.5, color="white", lw=0.3)
    ax2.set_xticks(range(3), ["previous\ntoken", "first\ntoken", "spread"], fontsize=8)
    ax2.set_yticks([])
    ax2.set_title("per head", fontsize=10)
    fig.colorbar(side_image, ax=ax2, pad=0.03)
    fig.suptitle("Attention against distance: local heads are bright at d = 0-1; sink heads put their mass on the "
                 "first token\n(bright far right, where d = t); broad heads spread evenly", fontsize=11)
    fig.savefig(path, dpi=dpi)


def plot_rope_pairs(plt, data: dict, path, dpi: int) -> None:
    """Mean length of each RoPE pair (heads averaged, relative to the layer's mean pair) against its wavelength."""
    wave, T, trained = data["rope_wavelength"], len(data["tokens"]), int(data["trained_window"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, name, who in zip(axes, ("rope_pair_q_norm", "rope_pair_k_norm"), ("queries", "keys")):
        norm = data[name].mean(1)  # (L, hd/2): heads averaged
        L = len(norm)
        for layer, row in enumerate(norm):
            ax.plot(wave, row / row.mean(), color=cmap(layer / max(1, L - 1)), lw=1, alpha=0.7)
        overall = (norm / norm.mean(1, keepdims=True)).mean(0)  # (hd/2,): the layers averaged
        ax.plot(wave, overall, color="black", lw=2.5, label="all layers")
        ax.axhline(1, color="0.5", lw=0.8)
        ax.legend(loc="upper left", fontsize=9)
        ax.axvline(T, color="tab:red", ls="--", lw=1)
        ax.text(T, 0.98, f" prompt: {T} tokens", color="tab:red", transform=ax.get_xaxis_transform(), va="top")
        if trained:
            ax.axvline(trained, color="black", ls=":", lw=1)
            ax.text(trained, 0.90, f" trained context: {trained}", transform=ax.get_xaxis_transform(), va="top")
        ax.set_xscale("log")
        ax.set_xlabel("wavelength of the pair: 2π/θ_i tokens (fast pairs left, slow pairs right)")
        ax.set_title(f"{who}: the slowest quarter of the pairs holds {slow_share(data[name]):.0%}\n"
                     "of the summed pair lengths (25% if all pairs were alike)", fontsize=10)
    axes[0].set_ylabel("mean |pair| / the layer's mean over pairs")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(data["rope_pair_q_norm"]) - 1))
    fig.colorbar(sm, ax=axes, label="layer", pad=0.01)
    fig.suptitle("RoPE pair usage: how long each pair (q[2i], q[2i+1]) of the projection is, before rotation "
                 "(1 = an average pair)", fontsize=11)
    fig.savefig(path, dpi=dpi)


def plot_logit_lens(plt, data: dict, path, dpi: int) -> None:
    """Rows j = 0..L (embeddings at the bottom, the model's prediction on top), columns = prompt positions."""
    prob, text = data["logit_lens_prob"], data["logit_lens_text"]
    rows, T = prob.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.75 * T, 2.5 + 0.3 * rows))
    image = ax.imshow(prob, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for j in range(rows):
        for t in range(T):
            hit = t + 1 < T and top_is_next(data, j, t)
            ax.text(t, j, text[j, t][:8], ha="center", va="center", fontsize=6,
                    color="white" if prob[j, t] > 0.6 else "black", fontweight="bold" if hit else "normal")
    ax.set_yticks(range(rows), ["embeddings"] + [f"after block {j}" for j in range(1, rows)], fontsize=6)
    ax.set_xticks(range(T), list(data["token_text"]), rotation=90, fontsize=7)
    ax.set_xlabel("input token at position t (each cell: the next token predicted from it)")
    top_axis = ax.secondary_xaxis("top")
    top_axis.set_xticks(range(T), list(data["token_text"][1:]) + ["?"], rotation=90, fontsize=7)
    top_axis.set_xlabel("the prompt's actual next token")
    fig.colorbar(image, ax=ax, label="probability of the top token", pad=0.01)
    ax.set_title("Logit lens: final norm + output projection applied to the residual stream after each block "
                 "(bold: the prompt's actual next token)", fontsize=11, pad=70)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def top_is_next(data: dict, j: int, t: int) -> bool:
    return bool(data["logit_lens_top"][j, t] == data["tokens"][t + 1])


PICTURES = {  # name -> (file name, plot function)
    "attention": ("inspect_attention.png", plot_attention),
    "distance": ("inspect_distance.png", plot_distance),
    "rope_pairs": ("inspect_rope_pairs.png", plot_rope_pairs),
    "logit_lens": ("inspect_logit_lens.png", plot_logit_lens),
}


def require_matplotlib():
    """matplotlib.pyplot with the file-only Agg backend, or one EnvironmentFailure line saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise EnvironmentFailure(f"the pictures need matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(data: dict, out, dpi: int = 100, names=None, heads: Optional[list] = None) -> list:
    """Draw the named pictures (default: all) from an inspect.npz's arrays into folder `out`; returns the paths.

    `heads`: [(layer, head)] for the attention maps (default: choose_heads)."""
    plt = require_matplotlib()
    out = Path(out)
    paths = []
    for name in names or PICTURES:
        file_name, plot = PICTURES[name]
        extra = dict(heads=heads) if name == "attention" and heads else {}

        def write(tmp: str, plot=plot, extra=extra) -> None:
            with open(tmp, "wb") as f, warnings.catch_warnings():  # a file object: PNG whatever the temp name
                warnings.filterwarnings("ignore", "Glyph .* missing from font")  # a CJK token: drawn as a box
                plot(plt, data, f, dpi, **extra)
            plt.close("all")

        paths.append(atomic_write(out / file_name, write))
    return paths
