"""Training: from scratch or fine-tuning (full or LoRA), one process or several (DDP / FSDP2 under torchrun).

  loop.py     train(): the loop, evaluation, samples
  config.py   TrainConfig: every setting, with its documentation
  prepare.py  building the model, tokenizer and data for a run
  data.py     text and chat records -> packed token windows; the batch order (resumable)
  lora.py     low-rank adapters, and merging them back
  state.py    the run folder: checkpoints, exact resume, the final export
  metrics.py  metrics.jsonl and the lines printed per step
  dist.py     the process group and model wrapping for several processes

May import: model, checkpoint, generation, text, formats, runtime, decoding, parallel, files, errors.
Never cli.
"""
