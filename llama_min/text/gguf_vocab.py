"""GGUF vocabularies (``tokenizer.ggml.*`` metadata) turned back into real tokenizers.

The file itself is read by ``llama_min.files.gguf``; this module only converts vocabularies:

- ``spm_model_from_gguf_vocab``: a sentencepiece ``ModelProto`` (BPE, byte fallback, identity normalizer)
  from a ``'llama'`` vocab. Written with a tiny protobuf encoder so no ``protobuf`` package is needed.
  With ``meta_llama2=True`` it carries Meta's training settings and is byte-identical to Meta's file.
- ``hf_tokenizer_from_gguf``: a byte-level BPE ``tokenizers.Tokenizer`` from a ``'gpt2'`` vocab.
- ``hf_tokenizer_from_spm_vocab``: a ``'llama'`` vocab as a ``tokenizers.Tokenizer`` encoding like its sentencepiece
  model (what an HF folder needs).
- ``gguf_special_ids``, ``gguf_add_bos`` / ``gguf_add_eos``, ``bos_eos_post_processor``: what the vocab says about
  its special tokens, and the tokenizer.json post-processor that says the same to transformers.
- ``byte_level_decode`` / ``byte_level_encode``: GPT-2's byte-level alphabet (each byte spelled as one
  printable char, ``BYTE_OF_CHAR``) to bytes and back.
"""

from __future__ import annotations

import struct

from ..errors import LlamaMinError

# Llama 3's pre-tokenizer split pattern (tiktoken's ``pat_str``; the same regex as in Llama 3's tokenizer.json)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ------------------------------------------------------------------------ sentencepiece ModelProto


_ONE_BYTE = [bytes((i,)) for i in range(128)]
_F32 = struct.Struct("<f")


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _ONE_BYTE[n]
    n &= (1 << 64) - 1                                # negative int32/int64: two's complement, 10 bytes
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bool/int as varint (wire 0), float as float32 (wire 5), str/bytes as wire 2."""
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _message(fields) -> bytes:
    return b"".join(_field(number, value) for number, _name, value in fields)


def _piece(piece: str, score: float, kind: int) -> bytes:
    """ModelProto field 1, one SentencePiece: piece (1, bytes), score (2, float32), type (3) unless NORMAL (1).
    The same bytes as _field(1, _message(...)), spelled out: it runs once per token of a 32k-128k vocabulary,
    at every load (3.5x faster than the general form)."""
    data = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(data)) + data + b"\x15" + _F32.pack(score)
    if kind != 1:
        body += b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


# Meta's Llama 2 TrainerSpec (field number, name, value), in field order as the file stores it.
META_LLAMA2_TRAINER = [
    (1, "input", "/large_experiments/theorem/datasets/MERGED/all.test1.merged"),
    (2, "model_prefix", "spm_model_32k_200M_charcov099995_allowWSO__v2"),
    (3, "model_type", 2),                            # BPE
    (4, "vocab_size", 32000),
    (6, "self_test_sample_size", 0),
    (7, "input_format", "text"),
    (10, "character_coverage", 0.99995),
    (11, "input_sentence_size", 200000000),
    (14, "seed_sentencepiece_size", 1000000),
    (15, "shrinking_factor", 0.75),
    (16, "num_threads", 80),
    (17, "num_sub_iterations", 2),
    (18, "max_sentence_length", 4192),
    (19, "shuffle_input_sentence", True),
    (20, "max_sentencepiece_length", 16),
    (21, "split_by_unicode_script", True),
    (22, "split_by_whitespace", True),
    (23, "split_by_number", True),
    (24, "treat_whitespace_as_suffix", False),
    (25, "split_digits", True),
    (26, "allow_whitespace_only_pieces", True),
    (32, "vocabulary_output_piece_score", True),
    (33, "hard_vocab_limit", True),
    (34, "use_all_vocab", False),
    (35, "byte_fallback", True),
    (36, "required_chars", ""),
    (40, "unk_id", 0),
    (41, "bos_id", 1),
    (42, "eos_id", 2),
    (43, "pad_id", -1),
    (44, "unk_surface", " \u2047 "),
    (45, "unk_piece", "<unk>"),
    (46, "bos_piece", "<s>"),
    (47, "eos_piece", "</s>"),
    (48, "pad_piece", "<pad>"),
    (49, "train_extremely_large_corpus", False),
    (50, "enable_differential_privacy", False),
    (51, "differential_privacy_noise_level", 0.0),
    (52, "differential_privacy_clipping_threshold", 0),
]

# Fields of the TrainerSpec that matter when encoding/decoding (the rest only describe training).
_ENCODE_FIELDS = {"model_type", "vocab_size", "treat_whitespace_as_suffix", "allow_whitespace_only_pieces",
                  "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id", "unk_surface", "unk_piece",
                  "bos_piece", "eos_piece", "pad_piece"}


def spm_model_from_gguf_vocab(tokens: list[str], scores: list[float] | None, types: list[int],
                              bos_id: int = 1, eos_id: int = 2, unk_id: int = 0, pad_id: int = -1,
                              add_dummy_prefix: bool = True, meta_llama2: bool = False) -> bytes:
    """A serialized sentencepiece ``ModelProto`` from a GGUF 'llama' vocabulary.

    ModelProto: field 1 = each piece (``piece`` 1, ``score`` 2 as float32, ``type`` 3 written only when not
    NORMAL; GGUF token types equal sentencepiece's: 1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte), field 2 = TrainerSpec (BPE with byte fallback), field 3 = NormalizerSpec
    (``identity``, no charsmap, dummy prefix on, extra-whitespace removal off). ``meta_llama2`` writes
    Meta's full training settings so the result is byte-identical to Llama 2's ``tokenizer.model``.
    """
    scores = scores if scores is not None else [0.0] * len(tokens)
    pieces = b"".join(_piece(p, float(s), t) for p, s, t in zip(tokens, scores, types))
    if meta_llama2:
        if len(tokens) != 32000:
            raise LlamaMinError(f"meta_llama2: expected 32000 tokens, got {len(tokens)}")
        trainer = META_LLAMA2_TRAINER
    else:
        names = {"vocab_size": len(tokens), "byte_fallback": 6 in types, "unk_id": unk_id, "bos_id": bos_id,
                 "eos_id": eos_id, "pad_id": pad_id, "unk_piece": tokens[unk_id],
                 "bos_piece": tokens[bos_id] if bos_id >= 0 else "<s>",
                 "eos_piece": tokens[eos_id] if eos_id >= 0 else "</s>",
                 "pad_piece": tokens[pad_id] if pad_id >= 0 else "<pad>"}
        trainer = [(n, name, names.get(name, v)) for n, name, v in META_LLAMA2_TRAINER if name in _ENCODE_FIELDS]
    normalizer = [(1, "name", "identity"), (2, "precompiled_charsmap", b""),
                  (3, "add_dummy_prefix", bool(add_dummy_prefix)), (4, "remove_extra_whitespaces", False),
                  (6, "normalization_rule_tsv", "")]
    return pieces + _field(2, _message(trainer)) + _field(3, _message(normalizer))


# ------------------------------------------------------------------------------- byte-level BPE


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map char -> byte: printable Latin-1 bytes spell themselves, the other 68 take U+0100.."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return {c: b for b, c in chars.items()}


BYTE_OF_CHAR = _byte_level_alphabet()  # GPT-2's byte-level alphabet: char -> byte, 256 entries
_CHAR_OF_BYTE = {b: c for c, b in BYTE_OF_CHAR.items()}


def byte_level_decode(token: str) -> bytes:
    """The raw bytes of a GPT-2 byte-level token string (e.g. ``'Ġworld'`` -> ``b' world'``)."""
    return bytes(BYTE_OF_CHAR[c] for c in token)


def byte_level_encode(data: bytes) -> str:
    """Bytes spelled in GPT-2's byte-level alphabet (e.g. ``b' world'`` -> ``'Ġworld'``)."""
    return "".join(_CHAR_OF_BYTE[b] for b in data)


# GGUF tokenizer.ggml.pre -> how text is split before BPE
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3"}
_DIGITS_GPT2_PRE = {"smollm", "starcoder", "refact"}      # single digits, then GPT-2's regex
_GPT2_PRE = {"default", "gpt2", "gpt-2"}


def hf_tokenizer_from_gguf(meta: dict, name: str = "GGUF file"):
    """A ``tokenizers.Tokenizer`` for a GGUF 'gpt2' (byte-level BPE) vocabulary.

    Tokens and merges are kept in the byte-level alphabet; control (3) and user-defined (4) tokens are
    added tokens. Pre-tokenization follows ``tokenizer.ggml.pre``: Llama 3's regex for 'llama-bpe' (with
    whole-word vocab hits taking precedence over merges, as tiktoken does), single digits + GPT-2's regex for
    'smollm', GPT-2's regex for 'default'/'gpt2'.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE)
    tk = Tokenizer(bpe)
    if pre in _LLAMA3_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_GPT2_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _GPT2_PRE:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise LlamaMinError(f"{name}: unsupported tokenizer.ggml.pre {pre!r} (supported: "
                         f"{', '.join(sorted(_LLAMA3_PRE | _DIGITS_GPT2_PRE | _GPT2_PRE))})")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return tk


# ------------------------------------------------------------------------------- special tokens

# transformers' special-token names -> the GGUF key holding the same id (llama.cpp spells "seperator")
GGUF_SPECIAL_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id", "cls_token": "tokenizer.ggml.cls_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}


def gguf_special_ids(meta: dict) -> dict[str, int]:
    """``{transformers name: id}`` of the special tokens a GGUF vocabulary names (``{"unk_token": 0, ...}``)."""
    n = len(meta.get("tokenizer.ggml.tokens") or [])
    ids = {name: meta.get(key) for name, key in GGUF_SPECIAL_KEYS.items()}
    return {name: int(i) for name, i in ids.items() if isinstance(i, int) and 0 <= i < n}


def gguf_add_bos(meta: dict) -> bool:
    """Whether text is fed after a BOS: ``tokenizer.ggml.add_bos_token``, else llama.cpp's default for the
    vocabulary (yes for a sentencepiece 'llama' vocab and for Llama 3's pre-tokenizer, no for other BPE)."""
    if "tokenizer.ggml.add_bos_token" in meta:
        return bool(meta["tokenizer.ggml.add_bos_token"])
    return meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE


def gguf_add_eos(meta: dict) -> bool:
    """Whether an EOS follows the text: ``tokenizer.ggml.add_eos_token`` (llama.cpp's default: no)."""
    return bool(meta.get("tokenizer.ggml.add_eos_token", False))


def bos_eos_post_processor(bos: tuple | None, eos: tuple | None) -> dict:
    """A tokenizer.json ``post_processor`` (``TemplateProcessing``) putting ``bos``/``eos`` around the text.

    ``bos``, ``eos``: ``(token text, id)`` or None. This is where transformers' fast tokenizers (and the
    ``tokenizers`` package with ``add_special_tokens=True``) take BOS/EOS from; a pair of texts gets them
    around each text, as Meta's Llama 3 tokenizer.json has it.
    """
    def template(seq: str, type_id: int) -> list:
        text = [{"Sequence": {"id": seq, "type_id": type_id}}]
        first = [{"SpecialToken": {"id": bos[0], "type_id": type_id}}] if bos else []
        last = [{"SpecialToken": {"id": eos[0], "type_id": type_id}}] if eos else []
        return first + text + last

    specials = {text: {"id": text, "ids": [i], "tokens": [text]} for text, i in filter(None, (bos, eos))}
    return {"type": "TemplateProcessing", "single": template("A", 0),
            "pair": template("A", 0) + template("B", 1), "special_tokens": specials}


# ------------------------------------------------------------------- sentencepiece vocab as tokenizer.json


def hf_tokenizer_from_spm_vocab(tokens: list[str], scores: list[float] | None, types: list[int],
                                unk_id: int = 0, add_dummy_prefix: bool = True):
    """A ``tokenizers.Tokenizer`` that encodes like the sentencepiece BPE model of a GGUF 'llama' vocab.

    The shape of Hugging Face's Llama 2 ``tokenizer.json``: spaces become ``▁`` and one ``▁`` is put
    in front (sentencepiece's dummy prefix), BPE with byte fallback for characters the vocabulary lacks.
    sentencepiece merges the adjacent pair whose joined piece scores highest; BPE merges the pair of
    lowest rank, so every split ``a + b`` of a normal piece is a merge, ranked by that piece's score.
    Control and unknown pieces are special added tokens, user-defined ones plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    scores = scores if scores is not None else [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    merges = [(-scores[i], i, normal[piece[:k]], piece[:k], piece[k:])
              for piece, i in normal.items() for k in range(1, len(piece))
              if piece[:k] in normal and piece[k:] in normal]
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in sorted(merges)], unk_token=tokens[unk_id],
                     fuse_unk=True, byte_fallback=True)
    tk = Tokenizer(bpe)
    steps = [normalizers.Prepend("▁")] if add_dummy_prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty in (2, 3)])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return tk
