"""llama_min: a minimal, exact and fast Llama-family reference implementation in PyTorch."""

from .checkpoint import load_checkpoint, save_checkpoint
from .generation import Llama
from .model import ModelArgs, Transformer
from .text.tokenizer import load_tokenizer

__all__ = ["Llama", "ModelArgs", "Transformer", "load_checkpoint", "load_tokenizer", "save_checkpoint"]
__version__ = "0.1.0"
