"""Decoding: what happens between one step's logits and the next token, and around whole requests.

  sampling.py, sampling_checks.py  temperature, top-k, Meta's top-p, min-p, repetition penalty (and their checks)
  stops.py        stop strings, matched on the streamed text
  speculative.py  a draft model proposes, the target checks in one step
  session.py      a chat session that keeps its KV cache between turns
  perplexity.py   perplexity of a text in windows, as llama.cpp's llama-perplexity counts it

May import: model, text, formats, checkpoint, runtime, parallel, files, errors. Never generation (which holds
these parts together and imports them), train or cli.
"""
