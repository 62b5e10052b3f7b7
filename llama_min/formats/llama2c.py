"""karpathy/llama2.c checkpoints: the training `.pt`, the `.bin` exports (versions 0, 1, 2) and `tokenizer.bin`.

All of them use Meta's tensor names and q/k layout (RoPE pairs interleaved), RoPE theta 10000 and
norm eps 1e-5; the output matrix is the embedding unless the file carries its own classifier.

  .pt      torch.save of {"model": state dict, "model_args": {dim, n_layers, n_heads, n_kv_heads, vocab_size,
           multiple_of, max_seq_len, dropout}, "optimizer", "iter_num", "best_val_loss", "config"}; keys
           may start with torch.compile's `_orig_mod.`. Read weights-only: every value is a tensor or a
           plain number/string/dict, so nothing is unpickled beyond that.
  .bin v0  int32 x7: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (< 0: a classifier of its
           own follows), max_seq_len; float32: embedding; per kind over all layers attention_norm, wq,
           wk, wv, wo, ffn_norm, w1, w2, w3; final norm; freqs_cos and freqs_sin (max_seq_len x hd/2
           each, recomputed here, so skipped); the classifier
  .bin v1  uint32 magic 0x616b3432, int32 version, the 7 int32, uint8 shared_classifier, zeros up to byte
           256; float32: all attention_norm, all ffn_norm, final norm, embedding, all wq, all wk, all wv,
           all wo, all w1, all w2, all w3, then the classifier if not shared
  .bin v2  as v1 with an int32 group_size after the flag; float32 norms (attention_norm, ffn_norm, final),
           then the matrices (embedding, wq .. w3, classifier) as int8, then their float32 scales, one per
           group of group_size consecutive values: w = q * scale (symmetric Q8_0)
  tokenizer.bin  uint32 max_token_length, then per token: float32 score, uint32 length, the UTF-8 bytes of
           its sentencepiece piece with "\u2581" written as " " and BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n"
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import LlamaMinError
from ..model import ModelArgs
from .common import cast, expected_shapes, torch_load

MAGIC = 0x616B3432  # "ak42"
LAYER_KINDS = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
V0_ORDER = ["tok_embeddings", *LAYER_KINDS, "norm", "<freqs>", "output"]
V1_ORDER = ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "attention.wq", "attention.wk",
            "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "output"]
V2_MATRICES = V1_ORDER[3:]


def is_llama2c(path: Path) -> bool:
    """A `.pt` file, or a `.bin` with llama2.c's magic or a consistent version-0 header."""
    if path.suffix == ".pt":
        return True
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC:
        return True
    return path.suffix == ".bin" and len(head) == 28 and _v0_size(struct.unpack("<7i", head)) == path.stat().st_size


def _args(header, shared: bool) -> ModelArgs:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    try:
        return ModelArgs(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=abs(vocab), max_seq_len=seq_len, tie_word_embeddings=shared,
                         trained_window=seq_len)
    except ValueError as e:
        raise LlamaMinError(f"llama2.c header {list(header)} is not a valid model ({e})") from None


def _names(order, args: ModelArgs) -> list:
    """Tensor names in file order: a layer kind expands to all layers, '<freqs>' stays a marker."""
    out = []
    for kind in order:
        if kind in LAYER_KINDS:
            out += [f"layers.{i}.{kind}.weight" for i in range(args.n_layers)]
        elif kind == "output" and args.tie_word_embeddings:
            continue
        else:
            out.append(kind if kind == "<freqs>" else f"{kind}.weight")
    return out


def _numel(name: str, args: ModelArgs, shapes: dict) -> int:
    if name == "<freqs>":  # freqs_cos and freqs_sin, max_seq_len x hd/2 each
        return args.max_seq_len * args.hd
    return int(np.prod(shapes[name]))


def _v0_size(header) -> int:
    """Bytes a version-0 file with this header holds, or -1 when the header is not a model's."""
    if min(header) == 0 or min(header[:5] + header[6:]) < 0:
        return -1
    try:
        args = _args(header, shared=header[5] > 0)
    except LlamaMinError:
        return -1
    shapes = expected_shapes(args)
    return 28 + 4 * sum(_numel(n, args, shapes) for n in _names(V0_ORDER, args))


def load_llama2c(path: Path, dtype):
    if path.suffix == ".pt":
        return _load_pt(path, dtype)
    data = np.memmap(path, dtype=np.uint8, mode="c")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic != MAGIC:
        header = struct.unpack_from("<7i", data, 0)
        return _read_floats(path, data, 28, _args(header, shared=header[5] > 0), V0_ORDER, dtype)
    version, *header = struct.unpack_from("<i7i", data, 4)
    shared = bool(data[36])
    args = _args(header, shared)
    if version == 1:
        return _read_floats(path, data, 256, args, V1_ORDER, dtype)
    if version == 2:
        (group,) = struct.unpack_from("<i", data, 37)
        return _read_q8(path, data, args, group, dtype)
    raise LlamaMinError(f"{path}: llama2.c .bin version {version} is not supported (expected 0, 1 or 2)")


def _take(path: Path, data, pos: int, count: int, np_dtype) -> np.ndarray:
    end = pos + count * np.dtype(np_dtype).itemsize
    if end > len(data):
        raise LlamaMinError(f"{path}: file ends at byte {len(data)}, the header's model needs more "
                            "(truncated, or a different llama2.c version)")
    return data[pos:end].view(np_dtype)


def _finish(path: Path, data, pos: int, args: ModelArgs, sd: dict):
    if pos != len(data):
        raise LlamaMinError(f"{path}: {len(data) - pos} bytes left after the last tensor (expected {pos} bytes "
                            "for the header's model)")
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return args, sd


def _read_floats(path: Path, data, pos: int, args: ModelArgs, order, dtype):
    """Versions 0 and 1: float32 tensors back to back in `order` (views into the memory-mapped file)."""
    shapes, sd = expected_shapes(args), {}
    for name in _names(order, args):
        n = _numel(name, args, shapes)
        arr = _take(path, data, pos, n, np.float32)
        pos += 4 * n
        if name != "<freqs>":
            sd[name] = cast(torch.from_numpy(arr).view(shapes[name]), dtype)
    return _finish(path, data, pos, args, sd)


def _read_q8(path: Path, data, args: ModelArgs, group: int, dtype):
    """Version 2: float32 norms, int8 matrices, then one float32 scale per group: w = q * scale."""
    shapes, sd, pos = expected_shapes(args), {}, 256
    for name in _names(V1_ORDER[:3], args):
        sd[name] = cast(torch.from_numpy(_take(path, data, pos, shapes[name][0], np.float32)), dtype)
        pos += 4 * shapes[name][0]
    matrices = _names(V2_MATRICES, args)
    if group <= 0 or any(int(np.prod(shapes[n])) % group for n in matrices):
        raise LlamaMinError(f"{path}: llama2.c v2 group size {group} does not divide the tensors")
    quants = []
    for name in matrices:
        quants.append(_take(path, data, pos, int(np.prod(shapes[name])), np.int8))
        pos += quants[-1].size
    for name, q in zip(matrices, quants):
        scale = torch.from_numpy(_take(path, data, pos, q.size // group, np.float32).copy())
        pos += 4 * scale.numel()
        w = torch.from_numpy(q.astype(np.float32)).view(-1, group) * scale[:, None]
        sd[name] = cast(w.view(shapes[name]), dtype)
    return _finish(path, data, pos, args, sd)


def _load_pt(path: Path, dtype):
    """llama2.c train.py's checkpoint: ModelArgs from `model_args`, FFN and vocab sizes from the tensors."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
        raise LlamaMinError(f"{path}: not a llama2.c checkpoint (expected a dict with 'model' and 'model_args')")
    sd = {}
    for key, t in ckpt["model"].items():
        key = key.removeprefix("_orig_mod.")
        if key not in ("freqs_cos", "freqs_sin"):
            sd[key] = cast(t, dtype)
    if "layers.0.feed_forward.w1.weight" not in sd or "tok_embeddings.weight" not in sd:
        raise LlamaMinError(f"{path}: llama2.c checkpoint without tok_embeddings / layers.0 feed_forward tensors")
    params = dict(ckpt["model_args"], hidden_dim=sd["layers.0.feed_forward.w1.weight"].shape[0],
                  vocab_size=sd["tok_embeddings.weight"].shape[0])
    params["trained_window"] = params.get("max_seq_len")  # the window train.py trained with
    try:
        args = ModelArgs.from_dict(params)
    except (TypeError, ValueError) as e:
        raise LlamaMinError(f"{path}: model_args {ckpt['model_args']} are not a valid model ({e})") from None
    out = sd.get("output.weight")
    args.tie_word_embeddings = out is None or torch.equal(out, sd["tok_embeddings.weight"])
    return args, sd
