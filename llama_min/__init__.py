"""llama_min: a minimal, exact and fast Llama-family reference implementation in PyTorch.

The public names below are imported on first use (PEP 562's module `__getattr__`), so `import llama_min`
and every `llama-min ... --help` start without loading torch; `from llama_min import Llama` works as usual.
"""

__all__ = ["Llama", "ModelArgs", "Transformer", "load_checkpoint", "load_tokenizer", "save_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`llama_min.Llama` and the other public names: the module that defines each, imported now."""
    if name in ("load_checkpoint", "save_checkpoint"):
        from . import checkpoint as module
    elif name == "Llama":
        from . import generation as module
    elif name in ("ModelArgs", "Transformer"):
        from . import model as module
    elif name == "load_tokenizer":
        from .text import tokenizer as module
    else:
        raise AttributeError(f"module 'llama_min' has no attribute {name!r}")
    return getattr(module, name)


def __dir__():
    return sorted(list(globals()) + __all__)
