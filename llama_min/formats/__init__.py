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
