"""Text: tokenizers and chat formats.

  tokenizer.py   load_tokenizer: sentencepiece / tiktoken tokenizer.model, tokenizer.json, a GGUF file's
                 vocabulary, llama2.c's tokenizer.bin; tokenizer_files (the files that carry a tokenizer)
  base.py        the Tokenizer interface every kind shares, and StreamDecoder (whole characters as they come)
  gguf_vocab.py  a GGUF file's vocabulary rebuilt as a sentencepiece model or a tokenizers' BPE
  llama2c.py     llama2.c's tokenizer.bin
  chat.py        chat formats (Meta's Llama 2 / 3, ChatML) and Jinja chat templates

May import: errors, files. Nothing above it (no model, formats, runtime, decoding, train or cli).
"""
