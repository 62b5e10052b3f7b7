"""Inspect: pictures of what RoPE and a model do.

  rope_viz.py  the README's RoPE figures (angles, rotation, relative-position invariance, decay, scaling)

May import: model, checkpoint, text, formats, files, errors. Never cli.
"""
