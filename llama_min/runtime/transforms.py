"""The inference transforms `Llama.build` applies to a built reference model, in order, and what each may change.

model.py is the reference; each transform rewrites a built model in place (module swaps, repacked
weights) and is tested against the untouched reference in the tests named here. "<= t" means what the
tests assert: torch.testing.assert_close(got, reference, atol=t, rtol=t), |got - ref| <= t + t * |ref|,
on the logits of prompts and of one-token steps through the KV cache.

  transform                  module            what it changes                        allowed difference (tests)
  quantize="int8"            quantize.py       nn.Linear -> Int8Linear (per channel)  int8 rounding (test_quantize)
  quantize="int4[-64|-128]"  quantize.py       nn.Linear -> Int4Linear (per group),   int4 rounding (test_quantize)
                                               one Int4Layout chosen per layer
  (packed GGUF)              packed.py         built from the file's blocks: mapped   none for Q8_0 / Q4_0 / Q4_1
                                               (BlockLinear), tiled (TiledLinear),    (the file's weights); fp16 /
                                               Int4Linear / Int8Linear (blocks.py)    bf16 scales, int8 rows else
                                                                                      (test_gguf_packed, test_blocks)
  fuse_projections           fusion.py         q/k/v in one product, w1/w3 in one     float: <= 1e-4; quantized: the
                                               (float or quantized; built at load)    same stored values (test_fast)
  FastAttention              attention.py      decode GQA without cache copies,       float rounding, <= 1e-5
                                               SDPA's own causal mask                 (test_fast)
  use_native_decode          native_decode.py  RMSNorm, one-token RoPE + cache write  float rounding, <= 1e-5
                                               + attention, and SwiGLU, each in one   (test_fast)
                                               call of llama_min's kernels
  use_native_linears         linear.py         float32 CPU weights multiplied by      float rounding, <= 1e-5
                                               llama_min's AVX2 kernel (native/)      (test_fast)
  use_onednn_linears         linear.py         (no AVX2 kernel) float32 CPU weights   float rounding, <= 1e-5
                                               in oneDNN's blocked layout             (test_fast)
  transpose_wide_layers      linear.py         (neither) float32 CPU wide weights     float rounding, <= 1e-5
                                               stored W^T                             (test_fast)
  use_huge_pages             hugepages.py      (Linux, CPU) large weights outside     none: the same bits
                                               mapped files moved onto 2 MB pages     (test_hugepages)

linear.py's docstring says which machines take which of the three float32 CPU layouts. All of them
together (an optimized float32 build against optimize=False): <= 1e-4 (test_fast).
`apply_transforms(model, optimize=False)` with no quantization leaves exactly model.py's classes.
The decode step that runs the transformed model is chosen apart from these, and held by name in
`Llama.step` (step.py): llama_min's C step, every layer in one call (<= 1e-5, test_native_step), or the
model's own forward; `Llama.compile()` puts compile.CompiledStep over it (one-token steps through
torch.compile, RoPE in real arithmetic; float rounding, <= 1e-4, test_compile).
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
    from .attention import use_fast_attention
    from .fusion import fuse_projections
    from .linear import onednn_available, transpose_wide_layers, use_native_linears, use_onednn_linears
    from .native_decode import use_native_decode

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
        use_native_linears(model)  # every float matrix through llama_min's AVX2 kernel (linear.py, native/)
    elif onednn:
        use_onednn_linears(model)  # every float matrix in oneDNN's layout (linear.py)
    elif cpu_float32:
        transpose_wide_layers(model)  # the rest: the output projection (and a tied embedding)
    if weight.device.type == "cpu":
        from .hugepages import use_huge_pages

        use_huge_pages(model)  # the large weights on 2 MB pages: fewer address translations per step
        from .memory import return_freed_memory

        return_freed_memory()  # the originals of fused and moved weights (else resident memory keeps them)
    return model
