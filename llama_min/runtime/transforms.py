"""The inference transforms `Llama.build` applies to a built reference model, in order, and what each may change.

model.py is the reference; each transform rewrites a built model in place (module swaps, repacked
weights) and is tested against the untouched reference in the tests named here:

  transform                  module        what it changes                       allowed difference (tests)
  quantize="int8"            quantize.py   nn.Linear -> Int8Linear (per-channel)  int8 rounding (test_quantize)
  quantize="int4[-64|-128]"  quantize.py   nn.Linear -> Int4Linear (per group)    int4 rounding (test_quantize)
  (packed GGUF)              formats/gguf_packed.py  built from the file's blocks  fp16 / bf16 rounding of scales
                                           as Int4Linear / Int8Linear            (test_gguf_packed)
  fuse_projections           fast.py       q/k/v in one product, w1/w3 in one     float rounding, <= 1e-4
                                           (float or quantized; built at load)    (test_fast)
  FastAttention              fast.py       decode GQA without cache copies,       float rounding, <= 1e-4
                                           SDPA's own causal mask                 (test_fast)
  use_native_decode          fast.py       RMSNorm, one-token RoPE + cache write  float rounding, <= 1e-5
                                           + attention, and SwiGLU, each in one   (test_fast)
                                           call of llama_min's AVX2 kernels
  use_native_linears         fast.py       float32 CPU weights multiplied by      float rounding, <= 1e-4
                                           llama_min's AVX2 kernel (native.py)    (test_fast)
  use_onednn_linears         fast.py       (no AVX2 kernel) float32 CPU weights   float rounding, <= 1e-5
                                           in oneDNN's blocked layout             (test_fast)
  transpose_wide_layers      fast.py       (neither) float32 CPU wide weights     float rounding, <= 1e-4
                                           stored W^T                             (test_fast)
  use_huge_pages             hugepages.py  (Linux, CPU) large weights outside     none: the same bits
                                           mapped files moved onto 2 MB pages     (test_hugepages)
  use_native_step            native_step.py  decode steps (< 32 new tokens): every  float rounding, <= 1e-5
                                           layer in one call of llama_min's C    (test_native_step)
                                           code, with the kernels of the rows above

`apply_transforms(model, optimize=False)` with no quantization leaves exactly model.py's classes.
`Llama.compile()` adds one more, on demand: fast.compile_decode (one-token steps through torch.compile,
RoPE in real arithmetic; float rounding, <= 1e-4, test_compile).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

def apply_transforms(model: nn.Module, optimize: bool = True, quantize: Optional[str] = None) -> nn.Module:
    """Quantize (if asked: "int8", "int4", "int4-64", "int4-128"), then the speed transforms (if optimize)."""
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize)
    if not optimize:
        return model
    from . import native
    from .fast import (fuse_projections, onednn_available, transpose_wide_layers, use_fast_attention,
                       use_native_decode, use_native_linears, use_onednn_linears)

    weight = model.norm.weight
    native_glue = weight.device.type == "cpu" and weight.dtype == torch.float32 and native.enabled()
    cpu_float32 = quantize is None and weight.device.type == "cpu" and weight.dtype == torch.float32
    own_kernel = cpu_float32 and native_glue
    onednn = cpu_float32 and not own_kernel and onednn_available()
    fuse_projections(model, transposed=cpu_float32 and not (own_kernel or onednn))  # built W^T at once if needed
    use_fast_attention(model)  # the attention layers left unfused (quantized projections)
    if native_glue:
        use_native_decode(model)  # norms and one-token attention in one kernel call each (any weight format)
    if own_kernel:
        use_native_linears(model)  # every float matrix through llama_min's AVX2 kernel (fast.py, native.py)
    elif onednn:
        use_onednn_linears(model)  # every float matrix in oneDNN's layout (fast.py)
    elif cpu_float32:
        transpose_wide_layers(model)  # the rest: the output projection (and a tied embedding)
    if weight.device.type == "cpu":
        from .hugepages import use_huge_pages

        use_huge_pages(model)  # the large weights on 2 MB pages: fewer address translations per step
    if native_glue:
        from .step import use_native_step

        use_native_step(model)  # decode steps through every layer in one call of llama_min's C code
    return model
