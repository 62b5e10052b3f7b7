"""llama2.c's tokenizer.bin: its vocabulary read, and rebuilt as a sentencepiece model.

  tokenizer.bin  uint32 max_token_length, then per token: float32 score, uint32 length, the UTF-8 bytes of
           its sentencepiece piece with "\u2581" written as " " and BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n"

The weights of llama2.c's checkpoints are read by llama_min.formats.llama2c.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import LlamaMinError
from .gguf_vocab import spm_model_from_gguf_vocab


BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def read_tokenizer_bin(path: Path) -> Optional[tuple]:
    """(pieces, scores) of a llama2.c tokenizer.bin, or None when the file is not one."""
    data = Path(path).read_bytes()
    if len(data) < 12:
        return None
    (max_len,) = struct.unpack_from("<I", data, 0)
    if not 0 < max_len <= 1024:
        return None
    pieces, scores, pos = [], [], 4
    while pos < len(data):
        if pos + 8 > len(data):
            return None
        score, n = struct.unpack_from("<fI", data, pos)
        if n > max_len or pos + 8 + n > len(data) or not np.isfinite(score):
            return None
        try:
            pieces.append(data[pos + 8:pos + 8 + n].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        scores.append(score)
        pos += 8 + n
    return (pieces, scores) if pieces else None


def llama2c_tokenizer_file(path) -> Optional[Path]:
    """The tokenizer.bin to load for `path`: the file itself, or the one beside a llama2.c checkpoint / in a
    folder that has no tokenizer.model or tokenizer.json; None when llama2.c's vocabulary is not involved."""
    path = Path(path)
    if path.is_file() and path.stat().st_size < 64 << 20 and read_tokenizer_bin(path) is not None:
        return path
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix not in (".pt", ".bin"):  # not a llama2.c checkpoint
        return None
    if any((folder / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return None
    return folder / "tokenizer.bin" if (folder / "tokenizer.bin").is_file() else None


def spm_model_from_tokenizer_bin(path: Path) -> bytes:
    """A serialized sentencepiece model for llama2.c's tokenizer.bin (Llama-2-style: unk 0, BOS, EOS, bytes).

    Piece types are not stored, so they are rebuilt: "<unk>" unknown, the BOS/EOS pieces control,
    "<0xNN>" byte, the rest normal; spaces go back to "\u2581".
    """
    read = read_tokenizer_bin(path)
    if read is None:
        raise LlamaMinError(f"{path}: not a llama2.c tokenizer.bin")
    pieces = [{"\n<s>\n": "<s>", "\n</s>\n": "</s>"}.get(p, p.replace(" ", "\u2581")) for p in read[0]]
    special = {"<unk>": 2, "<s>": 3, "</s>": 3}
    types = [special.get(p, 6 if BYTE_PIECE.fullmatch(p) else 1) for p in pieces]
    index = {p: i for i, p in enumerate(pieces)}
    return spm_model_from_gguf_vocab(pieces, read[1], types, bos_id=index.get("<s>", -1),
                                     eos_id=index.get("</s>", -1), unk_id=index.get("<unk>", 0))
