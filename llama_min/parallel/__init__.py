"""Parallel: tensor parallelism for generation (each torchrun rank holds a slice of every weight).

  layout.py   which weights split how (Meta's model-parallel layout), each rank's local modules
  sharded.py  the collectives around the local modules (all-reduce, all-gather)
  group.py    the process group: joining, agreeing, rank 0's choices, building a rank's model, leaving
  slicing.py  reading only this rank's slice of a checkpoint file

May import: model, text, formats, checkpoint, runtime, files, errors. Never decoding, generation, train or
cli.
"""
