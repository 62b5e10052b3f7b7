"""llama_min: a minimal, exact and fast Llama-family reference implementation in PyTorch."""

from .checkpoint import load_checkpoint, save_checkpoint
from .model import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer", "load_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
