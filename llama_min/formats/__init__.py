"""Checkpoint formats, each a reader (and writer) into the internal form: ModelArgs + Meta-named tensors.

  common   tensor access, expected shapes, the HF <-> Meta q/k row permutation
  meta     params.json + consolidated.NN.pth
  hf       config.json + safetensors / pytorch_model.bin (and writing it)
  gguf     llama.cpp's .gguf
  own      params.json + model.safetensors written by llama_min

No format knows the model beyond ModelArgs and the tensor names.
"""
