"""Serving: many requests on one model at once, for `llama-min serve` (an OpenAI-compatible HTTP server).

  engine.py        Engine: a background loop that admits requests at every decode step (continuous
                   batching) and streams each one's tokens to its Handle; Request, TokenEvent, DoneEvent,
                   QueueFull (the public API the HTTP layer calls)
  sequence.py      Request, Sequence (one request's state in the engine), the events, Handle
  scheduler.py     the waiting queue (bounded) and the running rows
  prefix_cache.py  keys/values of prompt prefixes in hashed blocks, kept under a byte budget, LRU eviction
  runner.py        the batched step: every row at its own position, over its own KV slot
  app.py           the HTTP layer (OpenAI shapes) on top of the engine

Layering: above generation and decoding (it runs a generation.Llama, samples with decoding.sampling, and
builds on runtime and model), below cli. May import model, runtime, decoding, generation, errors; never cli.
"""
