"""The inference transforms `Llama.build` applies to a built reference model, in order, and what each may change.

model.py is the reference; each transform rewrites a built model in place (module swaps, repacked
weights) and is tested against the untouched reference in the tests named here:

  transform                  module        what it changes                       allowed difference (tests)
  quantize="int8"            quantize.py   nn.Linear -> Int8Linear (per-channel)  int8 rounding (test_quantize)
  FastAttention              fast.py       decode GQA without cache copies,       float rounding, <= 1e-4
                                           SDPA's own causal mask                 (test_fast)
  transpose_wide_layers      fast.py       float32 CPU wide weights stored W^T    float rounding, <= 1e-4
                                                                                  (test_fast)

`apply_transforms(model, optimize=False)` with no quantization leaves exactly model.py's classes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

QUANTIZE_CHOICES = ("int8",)


def apply_transforms(model: nn.Module, optimize: bool = True, quantize: Optional[str] = None) -> nn.Module:
    """Quantize (if asked), then the speed transforms (if optimize); returns the same model object."""
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model)
    if not optimize:
        return model
    from .fast import transpose_wide_layers, use_fast_attention

    use_fast_attention(model)
    weight = model.norm.weight
    if quantize is None and weight.device.type == "cpu" and weight.dtype == torch.float32:
        transpose_wide_layers(model)
    return model
