"""Runtime: what turns the reference model into a fast one, each piece tested against model.py.

  transforms.py     apply_transforms: the order the transforms run in, and the one table of what each changes
  attention.py      FastAttention: decode GQA without copying the cache, SDPA's own causal mask
  fusion.py         fused projections: q/k/v in one product, the FFN's gate/up in another (float or quantized)
  linear.py         float32 CPU weights: the prompt policy (PREFILL_ROWS, prompt_linear) and the three layouts
                    (llama_min's AVX2 kernel, oneDNN's blocked layout, wide layers stored W^T), and which
                    machines take which
  native_decode.py  the norms, one-token attention and SwiGLU through llama_min's kernels
  quantize.py       int8 / int4 weight-only layers (quantizing, the layers, fusing them)
  int4_layouts.py   how 4-bit codes are stored and multiplied: one Int4Layout class per layout
  packed.py         a quantized GGUF's blocks as int8 / int4 layers, without going through float
  hugepages.py      large weights on 2 MB pages
  memory.py         free memory on the device, and refusing what will not fit before allocating it
  step.py           the decode step a Llama runs (its own forward, or every layer in one call of the C code)
  compile.py        one-token decode steps through torch.compile
  native/           llama_min's C kernels (kernels_avx2.c) and their build on first use

May import: model, text, formats, checkpoint, assets (the kernels' cache folder), files, errors. Never
parallel, decoding, generation, train or cli.
"""
