"""The sharded model's collectives: each wraps the module that computes a rank's local part (layout.py says
which weights split how) and exchanges activations with the other ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model import Transformer
from .layout import Layout, build_local_model, shard_state_dict


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
