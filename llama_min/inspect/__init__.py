"""Inspect: pictures of what RoPE and a model do.

  rope_viz.py   the README's RoPE figures (angles, rotation, relative-position invariance, decay, scaling)
  internals.py  one float32 pass of model.py over a prompt, read through forward hooks: attention, distance
                mass, RoPE pair lengths, logit lens -> inspect.npz (`llama-min inspect`)
  pictures.py   the pictures of `llama-min inspect`, drawn from an inspect.npz alone (numpy + matplotlib)
  long_context.py  NLL by position past the trained window under each RoPE scaling, and its picture
                (scripts/long_context_viz.py)

May import: model, checkpoint, text, formats, files, errors. Never cli.
"""
