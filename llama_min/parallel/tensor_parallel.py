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
fast attention) may run, and `add_collectives` wraps wo, w2, output and the embedding last.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
    with torch.device("meta"):
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
    with torch.device("meta"):
        model = Transformer(args)
    shard_modules(model, layout)
    model.load_state_dict(local_sd, assign=True, strict=True)
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The collectives: thin wrappers around whatever module computes the local part (nn.Linear,
# Int8Linear, TransposedLinear, ...), added after every other transform.
# ---------------------------------------------------------------------------------------------


class AllReduce(nn.Module):
    """Row-parallel layer: y = sum over ranks of inner(x_r), the partial products of each rank's columns."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x).contiguous()
        dist.all_reduce(y, group=self.group)
        return y


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.1x


def gather_last_dim(y: torch.Tensor, width: int, total: int, group=None) -> torch.Tensor:
    """Concatenate every rank's (..., w_r) along the last dim, w_r <= width (padded), trimmed to `total`."""
    world = dist.get_world_size(group)
    pad = width - y.shape[-1]
    flat = F.pad(y, (0, pad)).reshape(-1, width).contiguous()  # (M, width)
    out = torch.empty(world * flat.shape[0], width, dtype=y.dtype, device=y.device)
    _all_gather(out, flat, group=group)  # rank-major: (world, M, width)
    out = out.view(world, flat.shape[0], width).permute(1, 0, 2).reshape(*y.shape[:-1], world * width)
    return out[..., :total]


class GatherOutput(nn.Module):
    """Column-parallel output projection: each rank's vocabulary rows, logits all-gathered to (B, T, V)."""

    def __init__(self, inner: nn.Module, vocab_size: int, group=None):
        super().__init__()
        self.inner, self.group, self.vocab_size = inner, group, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = -(-self.vocab_size // dist.get_world_size(self.group))
        return gather_last_dim(self.inner(x), width, self.vocab_size, self.group)


class GatherEmbedding(nn.Module):
    """Embedding split by columns: each rank looks up its D/N features, all-gathered to (B, T, D)."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.inner(tokens)
        return gather_last_dim(h, h.shape[-1], h.shape[-1] * dist.get_world_size(self.group), self.group)


class VocabEmbedding(nn.Module):
    """Embedding split by vocabulary rows [lo, hi): own tokens looked up, others zero, then all-reduce."""

    def __init__(self, inner: nn.Module, lo: int, hi: int, group=None):
        super().__init__()
        self.inner, self.lo, self.hi, self.group = inner, lo, hi, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mine = (tokens >= self.lo) & (tokens < self.hi)
        local = torch.where(mine, tokens - self.lo, 0)
        h = self.inner(local)
        h = h * mine[..., None].to(h.dtype)
        dist.all_reduce(h, group=self.group)
        return h


def add_collectives(model: Transformer, group=None) -> Transformer:
    """Wrap wo, w2, the output projection and the embedding of a sharded model with their collectives."""
    layout = model.tensor_parallel
    for layer in model.layers:
        layer.attention.wo = AllReduce(layer.attention.wo, group)
        layer.feed_forward.w2 = AllReduce(layer.feed_forward.w2, group)
    model.output = GatherOutput(model.output, layout.args.vocab_size, group)
    if layout.emb_axis == 1:
        model.tok_embeddings = GatherEmbedding(model.tok_embeddings, group)
    else:
        model.tok_embeddings = VocabEmbedding(model.tok_embeddings, *layout.vocab_range(), group)
    return model


def tensor_parallelize(model: Transformer, group=None, emb_axis: int = 1) -> Transformer:
    """Split a full model held in memory by this process into its rank's part, with collectives.

    The in-memory route (tests, small models); `Llama.build(..., tensor_parallel=True)` instead reads
    only the rank's slice from the checkpoint (parallel/slicing.py)."""
    layout = Layout(model.params, dist.get_rank(group), dist.get_world_size(group), emb_axis)
    weight = model.norm.weight
    local = build_local_model(model.params, layout, shard_state_dict(model.state_dict(), layout))
    return add_collectives(local.to(device=weight.device, dtype=weight.dtype).eval(), group)


# ---------------------------------------------------------------------------------------------
# Process group, agreement between ranks
# ---------------------------------------------------------------------------------------------

DEFAULT_TIMEOUT_S = 60.0


def init_distributed(device: torch.device, timeout_s: Optional[float] = None) -> torch.device:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    gloo on the CPU, nccl on GPUs (one per local rank). A rank that dies or hangs makes every other
    rank fail within `timeout_s` (default env LLAMA_MIN_TP_TIMEOUT or 60 s) instead of waiting forever.
    Returns the device this rank computes on."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise LlamaMinError("tensor_parallel=True needs torchrun (env WORLD_SIZE, RANK, MASTER_ADDR unset)")
        timeout_s = timeout_s or float(os.environ.get("LLAMA_MIN_TP_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(leave_process_group)
    return device


def leave_process_group(wait_s: float = 10.0) -> None:
    """Wait (at most `wait_s` seconds) for every rank, then close the process group; run at exit.

    Without the wait, a gloo rank that finished first tears down its threads while a peer still
    talks to it, and one of them may abort ("terminate called without an active exception",
    SIGABRT) after printing a correct answer: 3 of 60 two-rank runs under load did, 0 of 80 with a
    barrier. gloo's monitored barrier gives up after `wait_s` (a peer that died or is stuck in
    another collective after an error), so a failing rank still exits within `wait_s`; nccl only
    closes."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=wait_s))
        except Exception:  # noqa: BLE001 (a peer is gone or stuck: nothing left to wait for)
            pass
    dist.destroy_process_group()


def agree(error: Optional[BaseException]) -> None:
    """Every rank reports whether its step failed; if any did, every rank raises the first failure's message.

    So a rank that cannot load its slice stops all ranks with the same one-line message."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise LlamaMinError(f"rank {rank} of {len(messages)}: {message}")


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of t on every rank (sampled tokens, stop decisions: rank 0 decides)."""
    if t.dtype == torch.bool:  # gloo has no bool: send bytes
        return broadcast_from_rank0(t.to(torch.uint8)).bool()
    t = t.contiguous()
    dist.broadcast(t, src=0)
    return t


def build_rank(load, device, optimize: bool = True, quantize: Optional[str] = None, timeout_s=None):
    """Join the process group and build this rank's model: `load(rank, world, device)` -> local model.

    Every rank reports whether its load worked before any rank goes on (`agree`), so one rank failing
    to read its slice stops all of them with one message. Then the other inference transforms run on
    the local modules and the collectives are added around them."""
    from ..runtime.transforms import apply_transforms

    device = init_distributed(device, timeout_s)
    model, error = None, None
    try:
        model = load(dist.get_rank(), dist.get_world_size(), device)
    except Exception as e:  # noqa: BLE001 (reported to every rank; re-raised below)
        error = e
    try:
        agree(error)
    except LlamaMinError:
        if error is not None and not isinstance(error, (ValueError, OSError)):
            raise error from None  # a bug, not bad input: this rank keeps its traceback
        raise
    apply_transforms(model, optimize=optimize, quantize=quantize)
    return add_collectives(model)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def read_on_rank0(read):
    """`read()` on rank 0 only, its result on every rank (a chat's stdin under torchrun)."""
    if not dist.is_initialized():
        return read()
    box = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
