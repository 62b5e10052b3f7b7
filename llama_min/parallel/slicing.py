"""Read one tensor-parallel rank's slice of a checkpoint, never the whole model.

Every reader opens its files memory-mapped and copies out only the rows or columns a rank keeps
(`layout.Layout.slices`), so a rank's peak memory is about 1/N of the weights:

  Meta    consolidated.NN.pth shards: with N ranks = N shards, rank r's tensors are shard r's as they
          are; otherwise each tensor is cut from the shards that overlap the rank's range (re-split)
  HF      model*.safetensors via safe_open(...).get_slice; wq/wk rows un-permuted per head, which works
          on a slice because a rank's rows are whole heads and HF permutes only within a head
  own     model.safetensors (llama_min's format), the same way without the permutation
  GGUF    rows (or whole 32/256-value blocks of columns) cut from the memory-mapped file, then
          dequantized; float tensors need no dequantizing
  llama.c read whole and cut (these files are small)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import detect_format, load_checkpoint
from ..errors import LlamaMinError
from ..files import read_json
from ..files.gguf import read_gguf_tensor_infos
from ..formats.common import cast, expected_shapes, hf_to_meta_qk, rope_override, safetensors_open, torch_load
from ..formats.gguf.read import args_from_gguf, gguf_tensor, gguf_to_meta_name
from ..formats.hf import HF_LAYER_TO_META, HF_TO_META, args_from_hf_config, hf_weight_files
from ..formats.meta import SHARD_DIM
from ..model import ModelArgs
from ..runtime.memory import check_window
from .layout import Layout, Slice, build_local_model, check_split, take


class MetaShards:
    """params.json + consolidated.00.pth .. NN.pth, each opened memory-mapped (weights-only) when first used."""

    def __init__(self, path: Path):
        self.path = path
        self.files = sorted(path.glob("consolidated.*.pth"))
        want = [f"consolidated.{i:02d}.pth" for i in range(len(self.files))]
        if [f.name for f in self.files] != want:
            raise LlamaMinError(f"{path}: shard files {[f.name for f in self.files]} are not numbered "
                                f"consolidated.00.pth .. {want[-1]} without gaps")
        self._shards: dict = {}
        self.args = ModelArgs.from_dict(read_json(path / "params.json", "params.json"))
        emb = self.shard(0).get("tok_embeddings.weight")
        if emb is None:
            raise LlamaMinError(f"{self.files[0]}: missing tensor 'tok_embeddings.weight'")
        n = len(self.files)
        self.hint = f"found {n} consolidated.*.pth shard file(s): is one missing or extra?"
        self.emb_axis = 0 if n > 1 and emb.shape[1] == self.args.dim else 1  # Llama 3 rows, Llama 1/2 columns
        if self.args.vocab_size <= 0:
            self.args.vocab_size = emb.shape[0] * (n if self.emb_axis == 0 else 1)

    def shard(self, i: int) -> dict:
        if i not in self._shards:
            self._shards[i] = torch_load(self.files[i])
        return self._shards[i]

    def _split_axis(self, name: str) -> Optional[int]:
        kind = name.split(".")[-2]
        return self.emb_axis if kind == "tok_embeddings" else SHARD_DIM.get(kind)

    def _piece(self, i: int, name: str) -> torch.Tensor:
        t = self.shard(i).get(name)
        if t is None:
            raise LlamaMinError(f"{self.files[i]}: missing tensor '{name}' (shards disagree)")
        return t

    def shape(self, name: str) -> tuple:
        """The merged tensor's shape; every shard's piece must have the same shape."""
        first, axis = self._piece(0, name), self._split_axis(name)
        if first.ndim == 1 or axis is None:
            return tuple(first.shape)
        shape = list(first.shape)
        shape[axis] *= len(self.files)
        return tuple(shape)

    def read(self, s: Slice) -> torch.Tensor:
        split = self._split_axis(s.source)
        first = self._piece(0, s.source)
        if first.ndim == 1 or s.axis is None:  # replicated (norms): shard 0's copy
            return first
        size, parts = first.shape[split], []
        for i in range(len(self.files)):
            lo, hi = i * size, (i + 1) * size
            if s.axis == split and (hi <= s.lo or lo >= s.hi):
                continue  # this shard holds none of the rank's rows/columns
            piece = self._piece(i, s.source)
            if piece.shape != first.shape:
                raise LlamaMinError(f"{self.files[i]}: '{s.source}' has shape {list(piece.shape)}, "
                                    f"{self.files[0].name} {list(first.shape)}: shards disagree")
            if s.axis == split:  # the part of [s.lo, s.hi) inside this shard
                parts.append(piece.narrow(split, max(s.lo, lo) - lo, min(s.hi, hi) - max(s.lo, lo)))
            else:
                parts.append(take(piece, s))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=split)
        return out if out.is_contiguous() else out.contiguous()


class SafetensorsFiles:
    """HF (config.json + model*.safetensors / pytorch_model*.bin) or own (params.json + model.safetensors)."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.hf, self.emb_axis = path, fmt == "hf", 1
        self.hint = "the config does not match the weights"
        if self.hf:
            self.args = args_from_hf_config(read_json(path / "config.json", "config.json"))
            files = hf_weight_files(path)
        else:
            self.args = ModelArgs.from_dict(read_json(path / "params.json", "params.json"))
            files = [path / "model.safetensors"]
        self.names = {v: k for k, v in HF_TO_META.items()} if self.hf else {}
        self.layer_names = {v: k for k, v in HF_LAYER_TO_META.items()}
        self.where = {}  # file key -> (file, shape, memory-mapped tensors of a .bin file or None)
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in the index but missing")
            if f.suffix == ".safetensors":
                with safetensors_open(f) as handle:
                    for key in handle.keys():
                        self.where[key] = (f, tuple(handle.get_slice(key).get_shape()), None)
            else:
                tensors = torch_load(f)
                for key, t in tensors.items():
                    self.where[key] = (f, tuple(t.shape), tensors)

    def _key(self, name: str) -> str:
        if not self.hf:
            return name
        if name in self.names:
            return self.names[name]
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{self.layer_names[rest[: -len('.weight')]]}.weight"

    def shape(self, name: str) -> tuple:
        key = self._key(name)
        if key not in self.where:
            raise LlamaMinError(f"{self.path}: missing tensor '{key}'")
        return self.where[key][1]

    def read(self, s: Slice) -> torch.Tensor:
        """The slice, copied out of a mapping opened for this tensor only and closed at once: the file
        pages it touched leave the process's memory with it, only the rank's copy stays."""
        self.shape(s.source)
        key = self._key(s.source)
        f, _, tensors = self.where[key]
        try:
            if tensors is not None:
                t = take(tensors[key], s)
            else:
                with safetensors_open(f) as handle:
                    t = take(handle.get_slice(key), s)
        except Exception as e:  # a truncated file fails here
            raise LlamaMinError(f"{f}: cannot read '{key}' ({e})") from None
        if self.hf and s.source.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = hf_to_meta_qk(t, t.shape[0] // self.args.hd)  # whole heads: un-permute each
        if not t.is_contiguous() or t.untyped_storage().nbytes() > t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)  # get_slice may return a view of a bigger buffer
        return t


class GGUFSlices:
    """A .gguf file memory-mapped; each slice cut from the raw rows (or whole blocks of columns)."""

    def __init__(self, path: Path):
        import numpy as np

        self.path, self.emb_axis, self.hint = path, 1, "the metadata does not match the tensors"
        meta, infos = read_gguf_tensor_infos(path)
        self.args = args_from_gguf(meta)
        self.size = path.stat().st_size
        self.infos = {}
        for name, dims, ggml_type, offset in infos:
            if name == "rope_freqs.weight":  # tiny: per-pair divisors of theta_i (Llama 3.1+)
                data = np.memmap(path, dtype=np.uint8, mode="r")
                t = gguf_tensor(data, dims, ggml_type, offset, torch.float32)
                del data
                self.args.rope_freq_divisors = [float(x) for x in t]
                continue
            self.infos[gguf_to_meta_name(name)] = (name, tuple(int(d) for d in reversed(dims)), ggml_type, offset)
        if "output.weight" not in self.infos:
            self.args.tie_word_embeddings = True
        if self.args.vocab_size <= 0:
            self.args.vocab_size = self.infos["tok_embeddings.weight"][1][0]

    def shape(self, name: str) -> tuple:
        if name not in self.infos:
            raise LlamaMinError(f"{self.path}: missing tensor for '{name}'")
        return self.infos[name][1]

    def read(self, s: Slice) -> torch.Tensor:
        import numpy as np
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        gguf_name, shape, ggml_type, offset = self.infos[s.source]
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        row_bytes = cols * type_size // block
        if offset + rows * row_bytes > self.size:
            raise LlamaMinError(f"{self.path}: tensor '{gguf_name}' runs past the end of the file (truncated?)")
        # a mapping of this tensor only, dropped after the copy below (its touched pages go with it)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(rows, row_bytes))
        if s.axis == 0:
            raw, rows = raw[s.lo : s.hi], s.hi - s.lo
        elif s.axis == 1:
            if s.lo % block or s.hi % block:
                raise LlamaMinError(f"{self.path}: '{gguf_name}' ({qtype.name}, blocks of {block}) cannot be split "
                                    f"at column {s.lo if s.lo % block else s.hi}; use fewer processes")
            raw, cols = raw[:, s.lo // block * type_size : s.hi // block * type_size], s.hi - s.lo
        raw = np.array(raw)  # the copy: rows, or whole blocks of columns
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        else:
            arr = dequantize(raw, qtype)
        arr = np.asarray(arr, dtype=np.float32).reshape(shape if len(shape) == 1 else (rows, cols))
        return torch.from_numpy(arr)


class WholeFile:
    """Formats without a slice reader (llama2.c files, small by nature): loaded whole, then cut."""

    def __init__(self, path: Path):
        self.args, self.sd = load_checkpoint(path)
        self.emb_axis, self.hint = 1, "the header does not match the tensors"

    def shape(self, name: str) -> tuple:
        return tuple(self.sd[name].shape)

    def read(self, s: Slice) -> torch.Tensor:
        return take(self.sd[s.source], s).clone()


def open_sliced(path: Path):
    """The slice reader for a checkpoint path (format detected as `load_checkpoint` does)."""
    fmt = detect_format(path)
    if fmt == "meta":
        return MetaShards(path)
    if fmt == "gguf":
        return GGUFSlices(path)
    if fmt in ("hf", "own"):
        return SafetensorsFiles(path, fmt)
    return WholeFile(path)


def load_rank_slices(path, rank: int, world: int, dtype: Optional[torch.dtype] = None,
                     preflight: Optional[Callable[[ModelArgs, Layout], None]] = None):
    """(ModelArgs, Layout, this rank's tensors) from a checkpoint, reading only the rank's slices.

    The split is checked against the model's sizes, and every tensor's full shape against ModelArgs,
    before any weight is read; so is `preflight(args, layout)` when given (load_rank_model: memory)."""
    path = Path(path)
    reader = open_sliced(path)
    args = reader.args
    check_split(args, world, str(path))
    layout = Layout(args, rank, world, reader.emb_axis)
    if preflight is not None:
        preflight(args, layout)
    want, slices = expected_shapes(args), layout.slices()
    for s in slices.values():
        if reader.shape(s.source) != want[s.source]:
            raise LlamaMinError(f"{path}: tensor '{s.source}' has shape {list(reader.shape(s.source))}, expected "
                                f"{list(want[s.source])} ({reader.hint})")
    sd = {name: cast(reader.read(s), dtype) for name, s in slices.items()}
    return args, layout, sd


def load_rank_model(path, rank: int, world: int, device=None, dtype=None, max_seq_len: Optional[int] = None,
                    max_batch_size: int = 1, rope_scaling=None):
    """This rank's part of the model at `path` (reference modules, local shapes; no collectives yet).

    Before its slices are read, the rank's share of the window (the whole RoPE table, its KV heads'
    cache for max_batch_size x max_seq_len, a forward) is checked against free memory (memory.check_window).
    `rope_scaling`: Llama.build's override of the file's RoPE scaling, applied to the args first."""
    def preflight(args: ModelArgs, layout: Layout) -> None:
        rope_override(args, rope_scaling)  # the args load_rank_slices returns: the model is built from them
        window = max_seq_len if max_seq_len is not None else args.max_seq_len
        item = torch.empty((), dtype=dtype or torch.float32).element_size()
        check_window(args, window, max_batch_size, device or "cpu", item, kv_heads=layout.kv_heads)

    args, layout, sd = load_rank_slices(path, rank, world, dtype, preflight)
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    return build_local_model(args, layout, sd, device=device).eval().requires_grad_(False)
