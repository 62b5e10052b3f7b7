"""Writing llama.cpp's GGUF: the model (f32, f16, bf16 or Q8_0) with its tokenizer and chat template inside.

  save_gguf(out, args, state_dict, tokenizer, qtype)   one .gguf file, written atomically

Layout (what llama.cpp, Ollama, LM Studio and transformers' GGUF loader read):
- metadata `llama.*` (sizes, eps, RoPE base) and `general.*`; tensors `token_embd`, `blk.N.{attn_norm,
  attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output`
  (left out when tied). q/k rows stay in Meta's interleaved order: GGUF uses the same RoPE pairing.
- norms (1-D) stay float32; matrices take `qtype`. Q8_0 = blocks of 32 along each row, an fp16 scale d
  and 32 int8: w = d * q (a matrix whose rows are not a multiple of 32 falls back to f16).
- Llama 3.1 scaled RoPE becomes a `rope_freqs` tensor of per-pair divisors: theta_i' = theta_i / rope_freqs[i];
  linear and yarn become `llama.rope.scaling.*` keys (dynamic has no GGUF form: refused).
- the tokenizer as `tokenizer.ggml.*`: a sentencepiece model as model 'llama' (pieces, scores, piece types,
  pre 'default'); a byte-level BPE (tokenizer.json, or Llama 3's tiktoken ranks) as model 'gpt2' (byte-level
  token strings, merges "a b", token types 1 normal / 3 control / 4 user-defined) with `tokenizer.ggml.pre`
  naming the pre-tokenizer the way llama.cpp's converter does (pretokenizer.py); plus the special ids it names
  (BOS, EOS, unknown, padding, ...; an HF folder's from its tokenizer_config.json),
  add_bos_token and `tokenizer.chat_template`.
- `keep`: the metadata of a GGUF file being converted. What it said and llama_min's ModelArgs and tokenizers
  do not carry wins over what the writer would derive (`kept_metadata`): `general.*` (name, licence, ...),
  `llama.context_length`, `llama.rope.scaling.*`, `tokenizer.ggml.pre`, every special-token id, the
  add_bos/add_eos/add_space_prefix flags and the chat templates. A GGUF -> GGUF conversion thus keeps every
  key llama.cpp reads for a Llama model.

Tensors are converted and written one at a time, so the export holds one extra tensor in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...errors import LlamaMinError
from ...files import atomic_write
from ...model import ModelArgs, rope_frequencies
from ...text.gguf_vocab import GGUF_SPECIAL_KEYS, byte_level_encode
from .. import GGUF_TYPES as QTYPES  # the one list of tensor types (formats/__init__.py)
from .pretokenizer import llama_cpp_pre_name
from .read import GGUF_LAYER_TO_META, GGUF_TO_META

FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # general.file_type (llama.cpp's LLAMA_FTYPE_*)

# What a GGUF source said that an export keeps (see kept_metadata); the writer decides these itself:
WRITER_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
KEPT_PREFIXES = ("general.", "llama.rope.scaling.", "tokenizer.chat_template")
KEPT_KEYS = ("llama.context_length", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
             "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
             "tokenizer.ggml.remove_extra_whitespaces")


def save_gguf(out_path, args: ModelArgs, state_dict: dict, tokenizer=None, qtype: str = "f32",
              chat_template: Optional[str] = None, name: str = "llama_min export",
              keep: Optional[dict] = None) -> Path:
    """Write `state_dict` (Meta names/layout) as one GGUF file; `tokenizer` (a llama_min Tokenizer) is embedded.

    qtype: f32 | f16 | bf16 | q8_0 for the matrices. chat_template defaults to the tokenizer's own.
    name: `general.name`. keep: the metadata of the GGUF file being converted; the keys `kept_metadata`
    picks from it win over what the writer derives (its `general.name` over `name`).
    Everything is checked before the file is started: a tokenizer llama.cpp could not read raises here.
    """
    import gguf

    if qtype not in QTYPES:
        raise LlamaMinError(f"GGUF type '{qtype}': expected one of {', '.join(QTYPES)}")
    plan = _tensor_plan(args, state_dict, qtype)
    said = kept_metadata(keep or {})
    meta = _model_metadata(args, name, qtype)
    if tokenizer is not None:
        meta.update(_tokenizer_metadata(tokenizer, args.vocab_size, said.get("tokenizer.ggml.pre")))
    meta.update(_template_metadata(chat_template, tokenizer))
    meta.update(said)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch="llama")
        for key, value in meta.items():
            _add_value(w, key, value)
        for gguf_name, tensor, ggml_type in plan:
            shape, nbytes = _stored_shape_and_size(tensor.shape, ggml_type)
            w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gguf_name, tensor, ggml_type in plan:
            w.write_tensor_data(_encode(tensor, ggml_type))
        w.close()

    return atomic_write(out_path, write)


def kept_metadata(meta: dict) -> dict:
    """The keys of a GGUF file's metadata that an export of it keeps as the file said them.

    Those llama_min's ModelArgs and tokenizers do not carry, or not exactly: `general.*` but the file type
    and architecture (the writer decides those), the context length (as the file said it), RoPE
    scaling keys, the pre-tokenizer name, every `*_token_id` (unknown and padding ids included), the
    add_bos/add_eos/add_space_prefix/remove_extra_whitespaces flags and the chat template(s).
    """
    def kept(key: str) -> bool:
        if key in WRITER_KEYS:
            return False
        special_id = key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
        return special_id or key in KEPT_KEYS or key.startswith(KEPT_PREFIXES)

    return {k: v for k, v in meta.items() if kept(k)}


def _add_value(w, key: str, value) -> None:
    """One metadata value in the type llama.cpp's writer gives such keys: ints u32, floats f32."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)  # the item type follows the items (str, int -> i32, float -> f32)
    else:
        raise LlamaMinError(f"GGUF metadata '{key}': cannot write a {type(value).__name__}")


def meta_to_gguf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight`, `tok_embeddings.weight` -> `token_embd.weight`."""
    base, _, suffix = name.rpartition(".")
    top = {v: k for k, v in GGUF_TO_META.items()}
    if base in top:
        return f"{top[base]}.{suffix}"
    layer = {v: k for k, v in GGUF_LAYER_TO_META.items()}
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in layer:
        return f"blk.{parts[1]}.{layer[parts[2]]}.{suffix}"
    raise LlamaMinError(f"tensor '{name}' has no GGUF name")


def _tensor_plan(args: ModelArgs, sd: dict, qtype: str) -> list:
    """[(GGUF name, tensor, GGML type)] in llama.cpp's order: embedding, blocks, final norm, output."""
    from gguf import GGMLQuantizationType as T

    matrix_type = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[qtype]
    names = ["tok_embeddings.weight"] + sorted(
        (k for k in sd if k.startswith("layers.")), key=lambda k: (int(k.split(".")[1]), k)) + ["norm.weight"]
    if not args.tie_word_embeddings:
        names.append("output.weight")
    plan = []
    for name in names:
        t = sd[name]
        ggml_type = T.F32 if t.ndim == 1 else matrix_type
        if ggml_type == T.Q8_0 and t.shape[-1] % 32:
            ggml_type = T.F16
        plan.append((meta_to_gguf_name(name), t, ggml_type))
    divisors = _rope_divisors(args)
    if divisors is not None:
        plan.append(("rope_freqs.weight", divisors, T.F32))
    return plan


def _rope_divisors(args: ModelArgs) -> Optional[torch.Tensor]:
    """Llama 3.1 scaling as llama.cpp stores it: base theta_i / scaled theta_i per RoPE pair (None if unscaled).

    Only llama3's (and divisors read from a GGUF): linear and yarn are metadata keys (_rope_scaling_metadata)."""
    if not args.use_scaled_rope and args.rope_freq_divisors is None:
        return None
    shape = dict(dim=args.dim, n_layers=1, n_heads=args.n_heads, head_dim=args.head_dim, rope_theta=args.rope_theta)
    llama3 = ModelArgs(**shape, use_scaled_rope=args.use_scaled_rope, rope_scaling_factor=args.rope_scaling_factor,
                       rope_low_freq_factor=args.rope_low_freq_factor, rope_high_freq_factor=args.rope_high_freq_factor,
                       rope_original_max_pos=args.rope_original_max_pos, rope_freq_divisors=args.rope_freq_divisors)
    return rope_frequencies(ModelArgs(**shape)) / rope_frequencies(llama3)


def _rope_scaling_metadata(args: ModelArgs) -> dict:
    """`llama.rope.scaling.*` for linear and yarn, as llama.cpp's converter writes them (llama3: rope_freqs).

    yarn's magnitude a goes in `attn_factor`, the multiplier llama.cpp's Llama graph applies on top of its
    default 0.1 ln(factor) + 1 (it reads neither `yarn_attn_factor` nor `yarn_log_multiplier` for Llama); the
    betas are written when not 32 and 1 (as the converter does; gguf_rope_scaling reads them back). Refused in
    one line: dynamic (llama.cpp has no such scaling) and yarn without truncation (llama.cpp always rounds).
    """
    from ...model import rope_magnitude, yarn_attention_factor

    kind, prefix = args.rope_scaling_type, "llama.rope.scaling."
    if kind is None or kind == "llama3":
        return {}
    if kind == "dynamic" or kind == "yarn" and not args.rope_truncate:
        what = "dynamic RoPE scaling" if kind == "dynamic" else "yarn RoPE scaling with truncate false"
        raise LlamaMinError(f"{what} has no GGUF form (llama.cpp has none); convert to own or hf, or run the "
                            "GGUF with --rope-scaling")
    meta = {prefix + "type": kind, prefix + "factor": float(args.rope_scaling_factor)}
    if kind == "yarn":
        meta[prefix + "original_context_length"] = args.rope_original_max_pos
        for key, value, default in (("yarn_beta_fast", args.rope_beta_fast, 32.0),
                                    ("yarn_beta_slow", args.rope_beta_slow, 1.0)):
            if value != default:
                meta[prefix + key] = float(value)
        a, default_a = rope_magnitude(args), yarn_attention_factor(args.rope_scaling_factor)
        if a != default_a:
            meta[prefix + "attn_factor"] = a / default_a
    return meta


def _stored_shape_and_size(shape, ggml_type) -> tuple:
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[ggml_type]
    return tuple(shape), int(np.prod(shape)) // block * type_size


def _encode(t: torch.Tensor, ggml_type) -> np.ndarray:
    """The bytes of one tensor in its GGML type (quantized along rows by the gguf package's quantizer)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    arr = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if ggml_type == T.F32:
        return arr
    if ggml_type == T.F16:
        return arr.astype(np.float16)
    return quantize(arr, ggml_type)


def _model_metadata(args: ModelArgs, name: str, qtype: str) -> dict:
    """general.* and llama.* keys for `args` (the architecture key is the GGUFWriter's own).

    The context length is the window the model was trained for when the source said it (max_seq_len is
    only what llama_min uses, capped at 8192), as llama.cpp's converter writes max_position_embeddings.
    """
    meta = {"general.name": name, "general.file_type": FILE_TYPE[qtype]}
    if qtype == "q8_0":
        meta["general.quantization_version"] = 2
    meta.update({
        "llama.context_length": args.trained_window or args.max_seq_len, "llama.embedding_length": args.dim,
        "llama.block_count": args.n_layers, "llama.feed_forward_length": args.ffn_hidden,
        "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(args.norm_eps), "llama.rope.freq_base": float(args.rope_theta),
        "llama.rope.dimension_count": args.hd, "llama.vocab_size": args.vocab_size,
    })
    if args.hd != args.dim // args.n_heads:
        meta["llama.attention.key_length"] = meta["llama.attention.value_length"] = args.hd
    meta.update(_rope_scaling_metadata(args))
    return meta


def _template_metadata(chat_template: Optional[str], tok) -> dict:
    """tokenizer.chat_template (`chat_template`, else the tokenizer's default), plus its named templates as
    `tokenizer.chat_template.NAME` listed in `tokenizer.chat_templates` (llama.cpp's keys)."""
    templates = dict(getattr(tok, "chat_templates", None) or {})
    default = chat_template or getattr(tok, "chat_template", None)
    meta = {"tokenizer.chat_template": default} if isinstance(default, str) and default else {}
    named = {k: v for k, v in templates.items() if k != "default" and v != default and k.isidentifier()}
    for k, v in named.items():
        meta[f"tokenizer.chat_template.{k}"] = v
    if named:
        meta["tokenizer.chat_templates"] = list(named)
    return meta


# ------------------------------------------------------------------------------------------------ tokenizer


def _tokenizer_metadata(tok, vocab_size: int, pre: Optional[str] = None) -> dict:
    """tokenizer.ggml.* for a llama_min tokenizer, padded with unused tokens up to the model's vocab size.

    pre: the pre-tokenizer name a GGUF source said; otherwise the one llama.cpp's converter would find.
    """
    meta = {}
    pre = pre or llama_cpp_pre_name(tok)
    if tok.kind == "sentencepiece":
        tokens, scores, types, space_prefix = spm_vocab(tok.sp.serialized_model_proto())
        meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": pre,
                     "tokenizer.ggml.add_space_prefix": space_prefix})
        merges = []
    else:
        tokens, types, merges = tiktoken_vocab(tok) if tok.kind == "tiktoken" else byte_level_vocab(tok)
        scores = None
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre})
    if len(tokens) > vocab_size:
        raise LlamaMinError(f"tokenizer has {len(tokens)} tokens, the model's vocabulary only {vocab_size}")
    pad = vocab_size - len(tokens)
    meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    meta["tokenizer.ggml.token_type"] = types + [5] * pad  # 5: unused
    if scores is not None:
        meta["tokenizer.ggml.scores"] = scores + [-1e9] * pad
    if merges:
        meta["tokenizer.ggml.merges"] = merges
    meta.update(_special_ids(tok))
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    return meta


def _special_ids(tok) -> dict:
    """The special ids the tokenizer names (BOS, EOS, unknown, padding, ...: an HF folder's
    tokenizer_config.json names, a sentencepiece model's own) and end-of-turn when it is not EOS."""
    meta = {GGUF_SPECIAL_KEYS[name]: i for name, i in tok.special_token_ids().items() if name in GGUF_SPECIAL_KEYS}
    eot = next((i for i in map(tok.token_id, ("<|eot_id|>", "<|im_end|>")) if i is not None), None)
    if eot is not None and eot != tok.eos_id:
        meta["tokenizer.ggml.eot_token_id"] = int(eot)
    return meta  # special_token_ids() holds only real ids


def _proto_fields(buf: bytes):
    """(field number, value) of a serialized protobuf message: varints as int, 32-bit as float, else bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 5:
            value, pos = struct.unpack_from("<f", buf, pos)[0], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise LlamaMinError(f"sentencepiece model: unsupported protobuf wire type {wire}")
        yield number, value


def _varint(buf: bytes, pos: int) -> tuple:
    result = shift = 0
    while True:
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return result, pos


def spm_vocab(proto: bytes) -> tuple:
    """(pieces, scores, types, add_dummy_prefix) of a sentencepiece ModelProto (field 1 = pieces: piece 1,
    score 2, type 3 with 1 = normal when absent; field 3 = normalizer, its field 3 = add_dummy_prefix)."""
    pieces, scores, types, dummy_prefix = [], [], [], True
    for number, value in _proto_fields(proto):
        if number == 1:
            fields = dict(_proto_fields(value))
            pieces.append(fields.get(1, b"").decode("utf-8"))
            scores.append(float(fields.get(2, 0.0)))
            types.append(int(fields.get(3, 1)))
        elif number == 3:
            dummy_prefix = bool(dict(_proto_fields(value)).get(3, 1))
    return pieces, scores, types, dummy_prefix


def byte_level_vocab(tok) -> tuple:
    """(tokens, types, merges) of a byte-level BPE `tokenizers` tokenizer (HF tokenizer.json)."""
    spec = json.loads(tok.tk.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LlamaMinError(f"tokenizer.json model type '{model.get('type')}': only byte-level BPE exports to GGUF")
    tokens, types = [None] * tok.n_words, [1] * tok.n_words
    for text, i in model["vocab"].items():
        tokens[i] = text
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4
    if None in tokens:
        raise LlamaMinError(f"tokenizer.json has no token with id {tokens.index(None)}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def tiktoken_vocab(tok) -> tuple:
    """(tokens, types, merges) for Llama 3's tiktoken ranks + its 256 special tokens.

    Tokens are the rank bytes in GPT-2's byte-level alphabet. tiktoken stores no merges; every split of
    a token t into two tokens (a, b) is a merge, ordered by (rank of t, rank of a, rank of b). That is the
    list Hugging Face's tokenizer.json and llama.cpp's Llama 3 GGUF carry (280147 merges for 128000 ranks).
    """
    ranks = tok.ranks
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = []
    for token, rank in by_rank:
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{byte_level_encode(token[:i])} {byte_level_encode(token[i:])}" for _, _, i in sorted(splits)]
    specials = sorted(tok.specials.items(), key=lambda kv: kv[1])
    tokens = [byte_level_encode(t) for t, _ in by_rank] + [name for name, _ in specials]
    return tokens, [1] * len(by_rank) + [3] * len(specials), merges
