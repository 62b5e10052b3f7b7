"""Parallel: tensor parallelism for generation (each torchrun rank holds a slice of every weight).

  layout.py   which weights split how (Meta's model-parallel layout), each rank's local modules
  sharded.py  the collectives around the local modules (all-reduce, all-gather)
  group.py    the process group: joining, agreeing, rank 0's choices, building a rank's model, leaving
  slicing.py  reading only this rank's slice of a checkpoint file

How it runs (`torchrun ... scripts/generate.py`, or `Llama.build(path, tensor_parallel=True)` in every process):
  wq, wk, wv, w1, w3 are split by output rows, wo and w2 by input columns (one all-reduce each), the output
  projection by vocabulary rows; each rank caches only its heads; model.py is untouched (llama_min/parallel/).
  N must divide the query heads, the FFN size and the dim, and the KV heads must be a multiple of N or divide it
  (Llama 3 70B, 8 KV heads, runs on 16); any other N stops with one line before loading. Every rank samples with
  the same generator and rank 0's token is broadcast: float32 on CPU gives the tokens and logits of one process
  within 1e-5 (tested with 2 and 4). Each rank reads only its slice, one tensor at a time (TinyLlama-1.1B float32:
  7.1 GiB in one process, 2.5 GiB in each of 2); on one CPU they share one memory bandwidth, so no speed-up there.
  A rank that fails stops every rank with rank 0 printing why; one that hangs, after LLAMA_MIN_TP_TIMEOUT s (60).

May import: model, text, formats, checkpoint, runtime, files, errors. Never decoding, generation, train or
cli.
"""
