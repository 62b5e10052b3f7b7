"""LoRA: low-rank adapters on a frozen model, merged back into plain weights for export.

A target linear layer y = x W^T gets a trainable low-rank update:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T,      A: (r, in), B: (out, r)

A starts random and B at zero, so training starts exactly from the base model. Only A and B are
trained (a few % of the parameters); merging computes W' = W + (alpha / r) * B A, after which the
model is a plain Llama again (`merge_state_dict`, `merge_lora`). Key names of the base weights do not change
(`layers.0.attention.wq.weight`); the adapters add `....wq.lora_A` / `....wq.lora_B`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LlamaMinError

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`, frozen) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # the very same Parameter: nothing copied
        self.weight.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        ref = base.weight
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=ref.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=ref.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as in the paper
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r) B A, in the base weight's dtype (the product is formed in float32)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}"


def parse_targets(targets) -> list[str]:
    """'wq,wv' or ['wq', 'wv'] -> validated list ('all' = every linear layer in the blocks)."""
    if isinstance(targets, str):
        targets = TARGETS if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise LlamaMinError(f"LoRA targets {bad or targets!r}: expected a comma-separated subset of {','.join(TARGETS)}")
    return list(targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=TARGETS) -> int:
    """Freeze every parameter, then put adapters on the target linears of every block.

    Returns the number of trainable parameters. The adapters' init draws from torch's global RNG.
    """
    if rank < 1:
        raise LlamaMinError(f"LoRA rank must be >= 1, got {rank}")
    targets = set(parse_targets(targets))
    model.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_state_dict(sd: dict, scale: float) -> dict:
    """Fold every `X.lora_A` / `X.lora_B` pair of a state dict into `X.weight` (W + scale * B A) and drop
    the lora_* keys: a plain Llama state dict. Works on full (gathered) CPU tensors."""
    out = {k: v for k, v in sd.items() if not re.search(r"\.lora_[AB]$", k)}
    for key in sd:
        if key.endswith(".lora_A"):
            base = key[: -len(".lora_A")]
            w = sd[f"{base}.weight"]
            delta = (sd[f"{base}.lora_B"].float() @ sd[key].float()) * scale
            out[f"{base}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in place by a plain nn.Linear holding the merged weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            plain.weight = nn.Parameter(module.merged_weight().detach(), requires_grad=False)
            setattr(model.get_submodule(parent_name), child, plain)
    return model
