"""One tokenizer interface over the formats Llama-family checkpoints ship.

Backends (``load_tokenizer`` picks one from the file):

- **sentencepiece** ``tokenizer.model`` (Llama 1/2, Mistral, TinyLlama): a serialized ``ModelProto``.
  BOS/EOS ids come from the model (Llama: 1 and 2; no pad piece, pad = -1).
- **tiktoken** ``tokenizer.model`` (Llama 3.x): text lines ``base64(token bytes) rank``, 128000 ranks, then
  256 special tokens at ids 128000.. that are not in the file (named as in SPEC.md section 4).
- **tokenizers** ``tokenizer.json`` (Hugging Face), with BOS/EOS from the ``tokenizer_config.json``,
  ``config.json`` and ``generation_config.json`` beside it.
- **GGUF** metadata ``tokenizer.ggml.*``: a ``'llama'`` vocab (pieces, scores, types) becomes a sentencepiece
  model; a ``'gpt2'`` vocab (GPT-2 byte-level strings + merges) a byte-level BPE for ``tokenizers``.

Text that looks like a special token (``"<|eot_id|>"``, ``"<s>"``) is always encoded as plain text: special
ids enter only through ``bos``/``eos`` and the chat formats (``llama_min.chat``), which insert them as ids.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from llama_min import chat
from llama_min.files import atomic_write
from llama_min.gguf_vocab import (byte_level_decode, hf_tokenizer_from_gguf, read_gguf_metadata,
                                  spm_model_from_gguf_vocab)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
# Special tokens 128000 + i. Llama 3.0 named i = 0, 1, 6, 7, 9 and numbered the rest in order
# <|reserved_special_token_K|> (128002..128005 -> K 0..3, 128008 -> 4, 128010 -> 5, .., 128255 -> 250);
# Llama 3.1 renamed 128008 <|eom_id|> (SPEC.md), which is what this table says.
LLAMA3_NAMED_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                         7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>"}


class Tokenizer:
    """The common interface; subclasses implement ``_encode``, ``decode`` and ``token_id``.

    Attributes: ``bos_id``, ``eos_id`` (ints, -1 when the vocabulary has none), ``stop_ids`` (generation
    stops on any of them), ``n_words`` (vocabulary size including special tokens), ``pad_id`` (-1: none),
    ``chat_format`` (``"llama2"``, ``"llama3"`` or ``"chatml"``), ``default_system`` (a system prompt the
    chat template adds when a dialog has none, or None), ``add_bos`` (whether plain text is fed after a
    BOS: true for Llama, false for SmolLM2's ChatML vocabulary), ``kind`` (the backend).
    """

    kind = "?"
    chat_template: str | None = None

    def __init__(self, n_words: int, bos_id: int, eos_id: int, stop_ids=(), pad_id: int = -1,
                 default_system: str | None = None, add_bos: bool | None = None):
        self.n_words, self.bos_id, self.eos_id, self.pad_id = n_words, bos_id, eos_id, pad_id
        self.default_system = default_system
        self.chat_format = chat.detect_format(self)
        self.add_bos = bos_id >= 0 and (self.chat_format != "chatml" if add_bos is None else bool(add_bos))
        self.stop_ids = {i for i in [eos_id, *stop_ids, *chat.stop_ids(self)] if i is not None and i >= 0}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token-looking text stays plain), with BOS/EOS ids if asked."""
        for asked, i, name in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if asked and i < 0:
                raise ValueError(f"this tokenizer has no {name} token")
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> int | None:
        """Id of the single token spelled ``text`` (e.g. ``"<|eot_id|>"``), or None if there is none."""
        raise NotImplementedError

    def encode_dialog(self, dialog: list[dict], open_assistant: bool = True) -> list[int]:
        """Ids of a chat in this tokenizer's format (see ``llama_min.chat``)."""
        return chat.encode_dialog(self, dialog, open_assistant)

    def encode_followup(self, messages: list[dict], open_assistant: bool = True) -> list[int]:
        """Ids that close a just-generated assistant reply and append ``messages`` (see ``llama_min.chat``)."""
        return chat.encode_followup(self, messages, open_assistant)

    def save(self, out_dir: str | Path) -> Path:
        """Write this tokenizer into ``out_dir`` in its backend's file format (atomically); return the file.

        sentencepiece and tiktoken: ``tokenizer.model``; tokenizers: ``tokenizer.json`` plus a
        ``tokenizer_config.json`` with BOS/EOS, ``add_bos_token`` and the chat template. ``load_tokenizer``
        on the dir gives the same tokenizer back (a GGUF vocabulary thus becomes a plain file).
        """
        raise NotImplementedError

    def stream_decoder(self) -> "StreamDecoder":
        """An incremental decoder: ``push(id) -> str`` as tokens arrive, ``flush() -> str`` at the end."""
        return StreamDecoder(self)

    def __repr__(self):
        return (f"{type(self).__name__}(n_words={self.n_words}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"stop_ids={sorted(self.stop_ids)}, chat_format={self.chat_format!r})")


class StreamDecoder:
    """Turns a stream of ids into printable text, never emitting half a UTF-8 character.

    Each push decodes a short window twice, with and without the new ids, and emits the difference: the
    window starts at the last chunk that printed something, so sentencepiece's leading spaces (which it
    drops on the first piece of a decode) come out right. While the text ends in U+FFFD (an incomplete
    byte sequence, e.g. 1-3 byte-fallback pieces of an emoji) nothing is emitted. The concatenation of
    all pushes and the final ``flush()`` equals ``tok.decode(all_ids)``.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []   # ids from the window start on (older ones are dropped)
        self.start = 0   # window start: the last chunk that printed text
        self.read = 0    # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        text = self._emit(final=True)
        self.ids, self.start, self.read = [], 0, 0
        return text

    def _emit(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self.start:self.read])
        text = self.tok.decode(self.ids[self.start:])
        new = text[len(done):]
        if not final and (not new or new.endswith("\ufffd")):
            return ""
        del self.ids[:self.read]            # the new window starts at the old read position
        self.start, self.read = 0, len(self.ids)
        return new


# ---------------------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``tokenizer.model`` of Llama 1/2, Mistral; or rebuilt from a GGUF)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, bos_id: int | None = None, eos_id: int | None = None,
                 name: str = "sentencepiece model", **kw):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as err:
            raise ValueError(f"{name}: not a valid sentencepiece model ({err})") from None
        super().__init__(self.sp.vocab_size(), self.sp.bos_id() if bos_id is None else bos_id,
                         self.sp.eos_id() if eos_id is None else eos_id, pad_id=self.sp.pad_id(), **kw)

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, text):
        i = self.sp.piece_to_id(text)
        return i if self.sp.id_to_piece(i) == text else None

    def save(self, out_dir):
        return atomic_write(Path(out_dir) / "tokenizer.model", self.sp.serialized_model_proto())


# --------------------------------------------------------------------------------------------- tiktoken


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken BPE: ranks from ``tokenizer.model`` + 256 special tokens after them."""

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], name: str = "llama3"):
        import tiktoken

        self.ranks, base = ranks, len(ranks)
        self.specials = {llama3_special_name(i): base + i for i in range(LLAMA3_NUM_SPECIAL)}
        self.enc = tiktoken.Encoding(name=name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.specials)
        super().__init__(self.enc.n_vocab, self.specials["<|begin_of_text|>"],
                         self.specials["<|end_of_text|>"])

    def _encode(self, text):
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def token_id(self, text):
        if text in self.specials:
            return self.specials[text]
        ids = self._encode(text)
        return ids[0] if len(ids) == 1 else None

    def save(self, out_dir):
        lines = (base64.b64encode(t) + b" %d\n" % r for t, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        return atomic_write(Path(out_dir) / "tokenizer.model", b"".join(lines))


def llama3_special_name(i: int) -> str:
    """Name of Llama 3 special token ``128000 + i``."""
    if i in LLAMA3_NAMED_SPECIALS:
        return LLAMA3_NAMED_SPECIALS[i]
    return f"<|reserved_special_token_{i - sum(1 for k in (0, 1, 6, 7, 9) if k < i)}|>"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one ``base64(bytes) rank`` line per token."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}: line {n} is not 'base64 rank' (expected a tiktoken rank file)") \
                    from None
    if sorted(ranks.values()) != list(range(len(ranks))):  # tiktoken panics on gaps and repeats
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} each once (a damaged tiktoken file?)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]  # byte-level BPE: every byte needs a rank
    if missing:
        raise ValueError(f"{path}: byte {missing[0]:#04x} has no rank (a damaged tiktoken file?)")
    return ranks


# ------------------------------------------------------------------------------------------- tokenizers


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json``, or built from a 'gpt2' GGUF vocab)."""

    kind = "tokenizers"

    def __init__(self, tk, bos_id: int, eos_id: int, chat_template: str | None = None, **kw):
        self.tk, self.chat_template = tk, chat_template
        self.tk.encode_special_tokens = True   # special-token text in user input stays plain text
        super().__init__(tk.get_vocab_size(with_added_tokens=True), bos_id, eos_id, **kw)

    def _encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, text):
        return self.tk.token_to_id(text)

    def save(self, out_dir):
        name = {i: self.tk.id_to_token(i) for i in (self.bos_id, self.eos_id) if i >= 0}
        config = {"bos_token": name.get(self.bos_id), "eos_token": name.get(self.eos_id),
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        atomic_write(Path(out_dir) / "tokenizer_config.json", json.dumps(config, indent=2).encode())
        return atomic_write(Path(out_dir) / "tokenizer.json", self.tk.to_str().encode())


def load_tokenizer_json(path: Path) -> HFTokenizer:
    """``tokenizer.json`` + BOS/EOS/stop ids from the HF config files beside it (when present)."""
    from tokenizers import Tokenizer as TkTokenizer

    try:
        tk = TkTokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
    configs = {n: _read_json(path.parent / n) for n in
               ("tokenizer_config.json", "config.json", "generation_config.json")}

    def token(which: str):                          # "bos" or "eos"
        tc = configs["tokenizer_config.json"].get(f"{which}_token")
        if isinstance(tc, dict):
            tc = tc.get("content")
        if isinstance(tc, str) and tk.token_to_id(tc) is not None:
            return tk.token_to_id(tc)
        for name in ("config.json", "generation_config.json"):
            i = configs[name].get(f"{which}_token_id")
            if i is not None:
                return i[0] if isinstance(i, list) else i
        return -1

    stops = configs["generation_config.json"].get("eos_token_id", [])
    stops = stops if isinstance(stops, list) else [stops]
    template = configs["tokenizer_config.json"].get("chat_template")
    return HFTokenizer(tk, token("bos"), token("eos"), stop_ids=stops, chat_template=template,
                       default_system=chat.default_system_from_template(template),
                       add_bos=configs["tokenizer_config.json"].get("add_bos_token"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------------ GGUF

def load_gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` metadata."""
    meta = read_gguf_metadata(path, prefix="tokenizer.")
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    bos = meta.get("tokenizer.ggml.bos_token_id", -1)
    eos = meta.get("tokenizer.ggml.eos_token_id", -1)
    extra = dict(default_system=chat.default_system_from_template(meta.get("tokenizer.chat_template")),
                 add_bos=meta.get("tokenizer.ggml.add_bos_token"))
    if model == "llama":
        proto = spm_model_from_gguf_vocab(
            tokens, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.token_type"),
            bos_id=bos, eos_id=eos, unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
            pad_id=meta.get("tokenizer.ggml.padding_token_id", -1),
            add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
        return SentencePieceTokenizer(proto, bos, eos, name=str(path), **extra)
    if model == "gpt2":
        tk = hf_tokenizer_from_gguf(meta, name=str(path))
        return HFTokenizer(tk, bos, eos, chat_template=meta.get("tokenizer.chat_template"), **extra)
    raise ValueError(f"{path}: unsupported tokenizer.ggml.model {model!r} (expected 'llama' or 'gpt2')")


def rebuild_llama2_tokenizer_model(gguf_path: Path) -> bytes:
    """Meta's Llama 2 ``tokenizer.model``, byte for byte, from llama.cpp's ``ggml-vocab-llama-spm.gguf``."""
    meta = read_gguf_metadata(gguf_path, prefix="tokenizer.")
    return spm_model_from_gguf_vocab(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                     meta["tokenizer.ggml.token_type"], meta_llama2=True)


def rebuild_llama3_tokenizer_model(gguf_path: Path) -> bytes:
    """Meta's Llama 3 tiktoken ``tokenizer.model``, byte for byte, from ``ggml-vocab-llama-bpe.gguf``.

    The first 128000 GGUF tokens are the ranks (id = rank), spelled in GPT-2's byte-level alphabet.
    """
    meta = read_gguf_metadata(gguf_path, prefix="tokenizer.")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    lines = [base64.b64encode(byte_level_decode(t)) + b" %d\n" % rank
             for rank, (t, ty) in enumerate(zip(tokens, types)) if ty == 1]
    return b"".join(lines)


# -------------------------------------------------------------------------------------- finding files

_SEARCH = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")


def find_tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file for a tokenizer file, a checkpoint dir, or a checkpoint file.

    A dir is searched for ``tokenizer.model`` (Meta, or HF with sentencepiece), ``original/tokenizer.model``
    (HF Llama 3), ``tokenizer.json`` (HF), then a single ``*.gguf``; a ``.gguf`` file carries its own; any
    other checkpoint file (``consolidated.00.pth``, ``model.safetensors``) means its dir.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (expected a tokenizer or checkpoint)")
    if path.is_file():
        checkpoint_file = path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.name.endswith(
            ".index.json") or path.name in ("params.json", "config.json", "generation_config.json")
        return find_tokenizer_file(path.parent) if checkpoint_file else path
    for name in _SEARCH:
        if (path / name).is_file():
            return path / name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise FileNotFoundError(f"{path}: no tokenizer found (expected {', '.join(_SEARCH)} or one .gguf file)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of ``path``: a tokenizer file, a checkpoint dir, or a ``.gguf`` file."""
    path = find_tokenizer_file(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"GGUF"):
        return load_gguf_tokenizer(path)
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return load_tokenizer_json(path)
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return TiktokenTokenizer(read_tiktoken_ranks(path))
    if not head:
        raise ValueError(f"{path}: empty file (expected a tokenizer.model, tokenizer.json or GGUF file)")
    try:
        return SentencePieceTokenizer(path.read_bytes(), name=str(path))
    except ValueError:
        raise ValueError(f"{path}: not a tokenizer (expected a sentencepiece or tiktoken tokenizer.model, "
                         "a tokenizer.json or a GGUF file)") from None

