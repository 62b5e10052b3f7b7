"""Parallel: tensor parallelism for generation (each torchrun rank holds a slice of every weight).

  tensor_parallel.py  the layout (which weights split how), sharded modules, the process group's life
  slicing.py          reading only this rank's slice of a checkpoint file

May import: model, text, formats, checkpoint, runtime, files, errors. Never decoding, generation, train or
cli.
"""
