"""GGUF files: reading a model into Meta's names and layout (read.py) and writing one (write.py).

The container itself (header, metadata, tensor table) is read by llama_min.files.gguf.
"""
