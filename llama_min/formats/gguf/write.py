"""Writing llama.cpp's GGUF: the model (f32, f16, bf16 or Q8_0) with its tokenizer and chat template inside.

  save_gguf(out, args, state_dict, tokenizer, qtype)   one .gguf file, written atomically

Layout (what llama.cpp, Ollama, LM Studio and transformers' GGUF loader read):
- metadata `llama.*` (sizes, eps, RoPE base) and `general.*`; tensors `token_embd`, `blk.N.{attn_norm,
  attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output`
  (left out when tied). q/k rows stay in Meta's interleaved order: GGUF uses the same RoPE pairing.
- norms (1-D) stay float32; matrices take `qtype`. Q8_0 = blocks of 32 along each row, an fp16 scale d
  and 32 int8: w = d * q (a matrix whose rows are not a multiple of 32 falls back to f16).
- Llama 3.1 scaled RoPE becomes a `rope_freqs` tensor of per-pair divisors: theta_i' = theta_i / rope_freqs[i].
- the tokenizer as `tokenizer.ggml.*`: a sentencepiece model as model 'llama' (pieces, scores, piece types);
  a byte-level BPE (tokenizer.json, or Llama 3's tiktoken ranks) as model 'gpt2' (byte-level token strings,
  merges "a b", token types 1 normal / 3 control / 4 user-defined) with `tokenizer.ggml.pre` naming the
  pre-tokenizer; plus BOS/EOS ids, add_bos_token and `tokenizer.chat_template`.

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
from ...text.gguf_vocab import LLAMA3_PATTERN, byte_level_encode
from .read import GGUF_LAYER_TO_META, GGUF_TO_META

QTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # general.file_type (llama.cpp's LLAMA_FTYPE_*)


def save_gguf(out_path, args: ModelArgs, state_dict: dict, tokenizer=None, qtype: str = "f32",
              chat_template: Optional[str] = None, name: str = "llama_min export") -> Path:
    """Write `state_dict` (Meta names/layout) as one GGUF file; `tokenizer` (a llama_min Tokenizer) is embedded.

    qtype: f32 | f16 | bf16 | q8_0 for the matrices. chat_template defaults to the tokenizer's own.
    """
    import gguf

    if qtype not in QTYPES:
        raise LlamaMinError(f"GGUF type '{qtype}': expected one of {', '.join(QTYPES)}")
    plan = _tensor_plan(args, state_dict, qtype)
    template = chat_template or getattr(tokenizer, "chat_template", None)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch="llama")
        _model_metadata(w, args, name, qtype)
        if tokenizer is not None:
            _tokenizer_metadata(w, tokenizer, args.vocab_size)
        if isinstance(template, str) and template:
            w.add_chat_template(template)
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
    """Llama 3.1 scaling as llama.cpp stores it: base theta_i / scaled theta_i per RoPE pair (None if unscaled)."""
    if not args.use_scaled_rope and args.rope_freq_divisors is None:
        return None
    plain = ModelArgs(dim=args.dim, n_layers=1, n_heads=args.n_heads, head_dim=args.head_dim,
                      rope_theta=args.rope_theta)
    return rope_frequencies(plain) / rope_frequencies(args)


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


def _model_metadata(w, args: ModelArgs, name: str, qtype: str) -> None:
    w.add_name(name)
    w.add_file_type(FILE_TYPE[qtype])
    if qtype == "q8_0":
        w.add_quantization_version(2)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.hd)
    w.add_vocab_size(args.vocab_size)
    if args.hd != args.dim // args.n_heads:
        w.add_key_length(args.hd)
        w.add_value_length(args.hd)


# ------------------------------------------------------------------------------------------------ tokenizer


def _tokenizer_metadata(w, tok, vocab_size: int) -> None:
    """tokenizer.ggml.* for a llama_min tokenizer, padded with unused tokens up to the model's vocab size."""
    if tok.kind == "sentencepiece":
        tokens, scores, types, space_prefix = spm_vocab(tok.sp.serialized_model_proto())
        w.add_tokenizer_model("llama")
        w.add_add_space_prefix(space_prefix)
    else:
        tokens, types, merges, pre = tiktoken_vocab(tok) if tok.kind == "tiktoken" else byte_level_vocab(tok)
        scores = None
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
    if len(tokens) > vocab_size:
        raise LlamaMinError(f"tokenizer has {len(tokens)} tokens, the model's vocabulary only {vocab_size}")
    pad = vocab_size - len(tokens)
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)])
    w.add_token_types(types + [5] * pad)  # 5: unused
    if scores is not None:
        w.add_token_scores(scores + [-1e9] * pad)
    for add, value in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                       (w.add_pad_token_id, tok.pad_id)):
        if value >= 0:
            add(value)
    if tok.kind == "sentencepiece" and tok.sp.unk_id() >= 0:
        w.add_unk_token_id(tok.sp.unk_id())
    eot = next((i for i in map(tok.token_id, ("<|eot_id|>", "<|im_end|>")) if i is not None), None)
    if eot is not None and eot != tok.eos_id:  # the end-of-turn token, when it is not EOS
        w.add_eot_token_id(eot)
    w.add_add_bos_token(bool(tok.add_bos))


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


def _pre_tokenizer_name(pre: Optional[dict]) -> str:
    """GGUF `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer llama_min's GGUF reader knows."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_PATTERN \
            and not steps[1].get("use_regex", True):
        return "llama-bpe"
    raise LlamaMinError(f"tokenizer pre-tokenizer {json.dumps(pre)[:120]} has no GGUF equivalent llama_min "
                        "knows (expected GPT-2's, SmolLM's digits + GPT-2, or Llama 3's split)")


def byte_level_vocab(tok) -> tuple:
    """(tokens, types, merges, pre) of a byte-level BPE `tokenizers` tokenizer (HF tokenizer.json)."""
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
    return tokens, types, merges, _pre_tokenizer_name(spec.get("pre_tokenizer"))


def tiktoken_vocab(tok) -> tuple:
    """(tokens, types, merges, 'llama-bpe') for Llama 3's tiktoken ranks + its 256 special tokens.

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
    return tokens, [1] * len(by_rank) + [3] * len(specials), merges, "llama-bpe"
