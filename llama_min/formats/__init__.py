"""Checkpoint formats, each a reader (and writer) into the internal form: ModelArgs + Meta-named tensors.

  common   tensor access, expected shapes, the HF <-> Meta q/k row permutation
  meta     params.json + consolidated.NN.pth
  hf       config.json + safetensors / pytorch_model.bin (and writing it)
  gguf     llama.cpp's .gguf
  own      params.json + model.safetensors written by llama_min
  llama2c  karpathy/llama2.c's .pt and .bin checkpoints and its tokenizer.bin
  gguf_write  writing a GGUF file (f32/f16/bf16/Q8_0 + tokenizer + chat template)

No format knows the model beyond ModelArgs and the tensor names.
"""
