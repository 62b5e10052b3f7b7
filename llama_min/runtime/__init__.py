"""Runtime: what turns the reference model into a fast one, each piece tested against model.py.

  transforms.py  apply_transforms: the order the transforms run in, and the one table of what each changes
  fast.py        attention shortcut, fused projections, float32 CPU layouts, the compiled decode step
  quantize.py    int8 / int4 weight-only layers and their layouts
  packed.py      a quantized GGUF's blocks as int8 / int4 layers, without going through float
  hugepages.py   large weights on 2 MB pages
  native_step.py a whole decode step in one call of the C code
  native/        llama_min's C kernels (kernels_avx2.c) and their build on first use

May import: model, text, formats, files, errors. Never parallel, decoding, train or cli.
"""
