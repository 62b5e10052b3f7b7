"""Tensor parallelism: one model split across N processes (torchrun), Meta's model-parallel layout.

Each of the N ranks holds 1/N of every layer and the ranks exchange activations twice per layer:

  wq wk wv w1 w3   column-parallel: rank r keeps a block of output rows, so it computes its own heads
                   (and its own slice of the FFN hidden units) from the full, replicated input x
  wo w2            row-parallel: rank r keeps the matching block of input columns and computes a
                   partial sum  y_r = x_r W_r^T;  one all-reduce gives  y = sum_r y_r  on every rank
  output           column-parallel by vocabulary rows: each rank computes the logits of its tokens,
                   an all-gather puts the full (B, T, V) logits on every rank
  tok_embeddings   split by columns (dim 1, Meta's Llama 1/2 `ParallelEmbedding`): each rank looks up
                   its D/N features of every token, an all-gather concatenates them. Meta's Llama 3
                   shards split it by rows (dim 0, vocabulary); loaded from such shards the rank keeps
                   its rows, looks up the tokens it owns (zeros elsewhere) and an all-reduce sums.
  norms            replicated

Heads are contiguous blocks of rows, so rank r owns query heads [r*H/N, (r+1)*H/N) and, when N
divides K, KV heads [r*K/N, (r+1)*K/N): each rank's attention is the reference attention over its
heads, and its KV cache holds only those heads. With fewer KV heads than ranks (K < N; K must
divide N) each rank keeps the one KV head its query heads read (head h reads KV head h // (H/K)), so
every KV head is stored on N/K ranks. Any other N is refused before loading.

The model code is untouched: `shard_modules` gives the reference modules their local shapes (and
each Attention its local head counts), weights are loaded into them, the other transforms (int8,
fast attention) may run, and `add_collectives` (sharded.py) wraps wo, w2, output and the embedding
last. group.py joins and leaves the process group and builds a rank's model; slicing.py reads only a
rank's slice of a checkpoint file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..checkpoint import shapes_only
from ..errors import LlamaMinError
from ..model import ModelArgs, Transformer

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # split by output rows (dim 0)
ROW = ("wo", "w2")  # split by input columns (dim 1), all-reduce after


@dataclass(frozen=True)
class Slice:
    """Rank's part of one tensor: rows/columns [lo, hi) along `axis` of tensor `source` (axis None = all)."""

    source: str
    axis: Optional[int] = None
    lo: int = 0
    hi: int = 0


def check_split(args: ModelArgs, world: int, source: str = "model") -> None:
    """Raise one clear error when N ranks cannot split this model (before any weight is read)."""
    H, K, N = args.n_heads, args.kv_heads, world
    problems = []
    if H % N:
        problems.append(f"{N} ranks must divide the {H} query heads")
    elif K % N and N % K:
        problems.append(f"the {K} key/value heads must divide {N} ranks or be a multiple of them")
    if args.ffn_hidden % N:
        problems.append(f"{N} ranks must divide the FFN hidden size {args.ffn_hidden}")
    if args.dim % N:
        problems.append(f"{N} ranks must divide the model dim {args.dim}")
    if problems:
        raise LlamaMinError(f"{source}: cannot split over {N} processes: " + "; ".join(problems)
                            + f" (H={H}, K={K}); choose --nproc_per_node accordingly")


@dataclass
class Layout:
    """Which part of every weight rank `rank` of `world` holds. emb_axis: 1 (columns) or 0 (vocab rows)."""

    args: ModelArgs
    rank: int
    world: int
    emb_axis: int = 1

    def __post_init__(self):
        check_split(self.args, self.world)
        if self.emb_axis not in (0, 1):
            raise ValueError(f"emb_axis must be 0 or 1, got {self.emb_axis}")

    @property
    def heads(self) -> int:
        return self.args.n_heads // self.world

    @property
    def kv_heads(self) -> int:
        return max(1, self.args.kv_heads // self.world)

    def kv_first(self) -> int:
        """First KV head of this rank: its own block when N divides K, else the head its queries read."""
        K, N = self.args.kv_heads, self.world
        if K >= N:
            return self.rank * (K // N)
        return (self.rank * self.heads) // (self.args.n_heads // K)

    def vocab_range(self) -> tuple:
        """Rows [lo, hi) of the vocabulary: ceil(V/N) per rank, the last rank possibly fewer (or none)."""
        per = -(-self.args.vocab_size // self.world)
        return min(self.rank * per, self.args.vocab_size), min((self.rank + 1) * per, self.args.vocab_size)

    def slices(self) -> dict:
        """Meta name -> Slice of the full tensor this rank keeps."""
        a, r, hd = self.args, self.rank, self.args.hd
        q = (r * self.heads * hd, (r + 1) * self.heads * hd)
        kv = (self.kv_first() * hd, (self.kv_first() + self.kv_heads) * hd)
        f = a.ffn_hidden // self.world
        ffn = (r * f, (r + 1) * f)
        d = a.dim // self.world
        emb = (r * d, (r + 1) * d) if self.emb_axis == 1 else self.vocab_range()
        out_src = "tok_embeddings.weight" if a.tie_word_embeddings else "output.weight"
        out = {"tok_embeddings.weight": Slice("tok_embeddings.weight", self.emb_axis, *emb),
               "norm.weight": Slice("norm.weight"), "output.weight": Slice(out_src, 0, *self.vocab_range())}
        parts = {"wq": (0, q), "wk": (0, kv), "wv": (0, kv), "wo": (1, q), "w1": (0, ffn), "w3": (0, ffn),
                 "w2": (1, ffn)}
        for i in range(a.n_layers):
            p = f"layers.{i}."
            out[p + "attention_norm.weight"] = Slice(p + "attention_norm.weight")
            out[p + "ffn_norm.weight"] = Slice(p + "ffn_norm.weight")
            for kind, (axis, (lo, hi)) in parts.items():
                name = p + ("attention." if kind in ("wq", "wk", "wv", "wo") else "feed_forward.") + kind + ".weight"
                out[name] = Slice(name, axis, lo, hi)
        return out


def take(t, s: Slice):
    """The part of tensor (or lazily sliceable file tensor) t that Slice s names."""
    if s.axis is None:
        return t[:]
    return t[s.lo : s.hi] if s.axis == 0 else t[:, s.lo : s.hi]


def shard_state_dict(state_dict: dict, layout: Layout) -> dict:
    """This rank's local tensors, cut from a full (Meta-named) state dict held in memory."""
    return {name: take(state_dict[s.source], s).clone() for name, s in layout.slices().items()}


def shard_modules(model: Transformer, layout: Layout) -> Transformer:
    """Give the reference modules their local shapes (on the meta device: no memory) and head counts."""
    a = layout.args
    d, f = a.dim, a.ffn_hidden // layout.world
    lo, hi = layout.vocab_range()
    emb_rows, emb_cols = (a.vocab_size, d // layout.world) if layout.emb_axis == 1 else (hi - lo, d)
    with shapes_only():
        model.tok_embeddings = nn.Embedding(emb_rows, emb_cols)
        model.output = nn.Linear(d, hi - lo, bias=False)
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            att.n_heads, att.n_kv_heads = layout.heads, layout.kv_heads
            att.n_rep = layout.heads // layout.kv_heads
            q, kv = layout.heads * a.hd, layout.kv_heads * a.hd
            att.wq, att.wk, att.wv = (nn.Linear(d, n, bias=False) for n in (q, kv, kv))
            att.wo = nn.Linear(q, d, bias=False)
            ffn.w1, ffn.w3, ffn.w2 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
    model.tensor_parallel = layout
    return model


def build_local_model(args: ModelArgs, layout: Layout, local_sd: dict, device=None, dtype=None) -> Transformer:
    """A Transformer holding this rank's tensors (no collectives yet: see `add_collectives`)."""
    with shapes_only():
        model = Transformer(args)
    shard_modules(model, layout)
    model.load_state_dict(local_sd, assign=True, strict=True)
    return model.to(device=device, dtype=dtype)
