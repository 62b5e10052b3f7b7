"""Checkpoint formats, each a reader (and writer) into the internal form: ModelArgs + Meta-named tensors.

  common   tensor access, expected shapes, the HF <-> Meta q/k row permutation
  meta     params.json + consolidated.NN.pth
  hf       config.json + safetensors / pytorch_model.bin (and writing it)
  gguf/    llama.cpp's .gguf: read.py (dequantized to float) and write.py (f32/f16/bf16/Q8_0 + tokenizer)
  own      params.json + model.safetensors written by llama_min
  llama2c  karpathy/llama2.c's .pt and .bin checkpoints (its tokenizer.bin: llama_min.text.llama2c)

No format knows the model beyond ModelArgs and the tensor names. May import: model, text, files, errors;
never runtime, parallel, decoding, train or cli. The public door is llama_min.checkpoint.
"""

# The one table of checkpoint formats: every help text, error message and listing reads it (no torch here,
# so `--help` stays fast). name -> (what llama_min calls it, what it looks like on disk, written by convert)
CHECKPOINT_FORMATS = {
    "gguf": ("GGUF", "a .gguf file, float or quantized", True),
    "hf": ("Hugging Face", "a folder with config.json + *.safetensors or pytorch_model*.bin, or a hub id "
           "already in the local Hugging Face cache", True),
    "meta": ("Meta", "a folder with params.json + consolidated.*.pth", False),
    "own": ("llama_min", "a folder with params.json + model.safetensors", True),
    "llama2c": ("llama2.c", "a llama2.c .bin or .pt file", False),
}

WRITTEN_FORMATS = tuple(key for key, (_, _, written) in CHECKPOINT_FORMATS.items() if written)  # convert --to
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what convert --dtype casts to
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the tensor types gguf/write.py writes (norms stay f32)


def format_name(fmt: str) -> str:
    """The name a message uses for a format key ('gguf' -> 'GGUF')."""
    return CHECKPOINT_FORMATS[fmt][0] if fmt in CHECKPOINT_FORMATS else fmt


def formats_sentence() -> str:
    """'GGUF (a .gguf file, ...); Hugging Face (a folder with ...); ...': what a checkpoint can be, in one line."""
    return "; ".join(f"{name} ({shape})" for name, shape, _ in CHECKPOINT_FORMATS.values())
