"""Training on several processes (torchrun): ranks, collectives, and wrapping the model in DDP or FSDP2.

  Dist            this process's rank in a torchrun job; barrier, sums and broadcasts (no-ops alone)
  wrap_model      DDP (every rank holds the model, gradients are averaged) or FSDP2 `fully_shard`
                  (parameters, gradients and optimizer state sharded over the ranks)
  no_sync         skip the gradient exchange on all but the last micro-step of an accumulation
  full_tensor     a whole tensor on the CPU (an FSDP2 shard is all-gathered)
  like            a whole tensor laid out like a (possibly sharded) parameter

Without torchrun every helper here is the identity and the world has one rank.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def log(msg: str) -> None:
    """A line on stderr, from rank 0 only (every rank runs the same code)."""
    if Dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank, world, local_rank = 0, 1, 0

    @classmethod
    def setup(cls, device_flag) -> torch.device:
        """Join the torchrun process group (gloo on CPU, nccl on GPUs) and pick this process's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cls.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and (device_flag or "cuda").startswith("cuda")
        device = torch.device(device_flag or (f"cuda:{cls.local_rank}" if cuda else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", cls.local_rank)
        if world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.is_initialized():
            cls.rank, cls.world = dist.get_rank(), dist.get_world_size()
        return device

    @staticmethod
    def barrier():
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def all_sum(t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(t)
        return t

    @staticmethod
    def broadcast_object(obj):
        """rank 0's `obj` on every rank."""
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @staticmethod
    def all_gather_object(obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not dist.is_initialized():
            return [obj]
        out = [None] * Dist.world
        dist.all_gather_object(out, obj)
        return out

    @classmethod
    def teardown(cls):
        """Leave the process group together: a rank that closed gloo while a peer still talked to it
        could abort at exit (see parallel.group.leave_process_group)."""
        from ..parallel.group import leave_process_group

        leave_process_group()
        cls.rank, cls.world, cls.local_rank = 0, 1, 0


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool) -> nn.Module:
    """The module the training step calls: the model itself alone, else DDP or (fsdp) FSDP2 in place.

    FSDP2 shards each block, then the rest (embeddings, final norm, output); parameter names stay those
    of the plain model. DDP adds a `module.` prefix that `trainable_named` removes.
    """
    if Dist.world == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (Dist.world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(wrapped: nn.Module, skip: bool):
    """A context in which backward() does not exchange gradients (when `skip` and there are several ranks)."""
    if not skip or Dist.world == 1:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    return _fsdp_no_sync(wrapped)


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def trainable_named(model: nn.Module) -> list:
    """(name, parameter) of the trainable parameters, names as in the unwrapped model."""
    return [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (an FSDP2 shard is all-gathered: every rank must call this)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: sharded the same way for an FSDP2 parameter, else on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full
