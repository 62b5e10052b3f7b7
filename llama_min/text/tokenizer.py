"""One tokenizer interface over the formats Llama-family checkpoints ship.

Backends (``load_tokenizer`` picks one from the file):

- **sentencepiece** ``tokenizer.model`` (Llama 1/2, Mistral, TinyLlama): a serialized ``ModelProto``.
  BOS/EOS ids come from the model (Llama: 1 and 2; no pad piece, pad = -1).
- **tiktoken** ``tokenizer.model`` (Llama 3.x): text lines ``base64(token bytes) rank``, 128000 ranks, then
  256 special tokens at ids 128000.. that are not in the file (``llama3_special_name``).
- **tokenizers** ``tokenizer.json`` (Hugging Face), with BOS/EOS from the ``tokenizer_config.json``,
  ``config.json`` and ``generation_config.json`` beside it.
- **GGUF** metadata ``tokenizer.ggml.*``: a ``'llama'`` vocab (pieces, scores, types) becomes a sentencepiece
  model; a ``'gpt2'`` vocab (GPT-2 byte-level strings + merges) a byte-level BPE for ``tokenizers``.

Text that looks like a special token (``"<|eot_id|>"``, ``"<s>"``) is always encoded as plain text: special
ids enter only through ``bos``/``eos`` and the chat formats (``llama_min.text.chat``), which insert them as ids.

A chat template shipped with the tokenizer (``chat_template.jinja`` or ``tokenizer_config.json`` beside the
file, or the GGUF's ``tokenizer.chat_template``) becomes ``tok.chat_templates`` and the default chat format.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from . import chat
from ..errors import LlamaMinError
from ..files import atomic_write, read_json
from ..files.gguf import read_gguf_metadata
from .base import StreamDecoder, Tokenizer  # noqa: F401  (StreamDecoder: re-exported)
from .gguf_vocab import (GGUF_SPECIAL_KEYS, LLAMA3_PATTERN, byte_level_decode, gguf_add_bos, gguf_special_ids,
                         hf_tokenizer_from_gguf, spm_model_from_gguf_vocab)
from .hf_files import gguf_tokenizer_files, hf_tokenizer_config, tokenizer_json

LLAMA3_NUM_SPECIAL = 256
# Special tokens 128000 + i. Named ones by version; the rest are <|reserved_special_token_K|>, K counting the
# unnamed ones in order. Llama 3.0: 128002..128005 -> K 0..3, 128008 -> 4, 128010 -> 5, .., 128255 -> 250.
# Llama 3.1 and later (the names in every HF Llama 3.1/3.2/3.3 tokenizer.json): 128002/3 -> 0/1,
# 128005 -> 2, 128011 -> 3, .., 128255 -> 247.
LLAMA3_NAMED_SPECIALS = {
    "3.0": {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
            9: "<|eot_id|>"},
    "3.1": {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
            7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"},
}


# ---------------------------------------------------------------------------------------- sentencepiece


class _NotSentencePiece(LlamaMinError):
    """The bytes are not a sentencepiece model."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``tokenizer.model`` of Llama 1/2, Mistral; or rebuilt from a GGUF)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, bos_id: int | None = None, eos_id: int | None = None,
                 name: str = "sentencepiece model", special_ids: dict[str, int] | None = None, **kw):
        """``special_ids``: ``{transformers name: id}`` of special tokens its source named beyond the model's."""
        import sentencepiece

        self.named_ids = dict(special_ids or {})
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as err:
            raise _NotSentencePiece(f"{name}: not a valid sentencepiece model ({err})") from None
        super().__init__(self.sp.vocab_size(), self.sp.bos_id() if bos_id is None else bos_id,
                         self.sp.eos_id() if eos_id is None else eos_id, pad_id=self.sp.pad_id(), **kw)

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, text):
        i = self.sp.piece_to_id(text)
        return i if self.sp.id_to_piece(i) == text else None

    def _control_tokens(self):
        """Control and unknown pieces (``<s>``, ``</s>``, ``<unk>``). (sentencepiece itself always matches its
        user-defined pieces in text, so those need nothing here.)"""
        sp = self.sp
        return {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}

    def special_token_ids(self) -> dict[str, int]:
        """``{transformers name: id}``: BOS, EOS, and the model's unknown and padding pieces."""
        return _present({**self.named_ids, "bos_token": self.bos_id, "eos_token": self.eos_id,
                         "unk_token": self.sp.unk_id(), "pad_token": self.pad_id})

    def save(self, out_dir):
        self._save_template(out_dir)
        return atomic_write(Path(out_dir) / "tokenizer.model", self.sp.serialized_model_proto())


# --------------------------------------------------------------------------------------------- tiktoken


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken BPE: ranks from ``tokenizer.model`` + 256 special tokens after them.

    ``names``: ``"3.1"`` (Llama 3.1 and later: ``<|eom_id|>`` 128008, ``<|python_tag|>`` 128010, ...) or
    ``"3.0"``; the file is the same for both, so ``load_tokenizer`` decides from the checkpoint beside it.
    """

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], name: str = "llama3", names: str = "3.1", **kw):
        import tiktoken

        self.ranks, self.names, base = ranks, names, len(ranks)
        self.specials = {llama3_special_name(i, names): base + i for i in range(LLAMA3_NUM_SPECIAL)}
        self.enc = tiktoken.Encoding(name=name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.specials)
        super().__init__(self.enc.n_vocab, self.specials["<|begin_of_text|>"],
                         self.specials["<|end_of_text|>"], **kw)

    def _encode(self, text):
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def token_id(self, text):
        if text in self.specials:
            return self.specials[text]
        ids = self._encode(text)
        return ids[0] if len(ids) == 1 else None

    def _control_tokens(self):
        return dict(self.specials)

    def special_token_ids(self) -> dict[str, int]:
        """``{transformers name: id}``: BOS and EOS (Llama 3 names no unknown or padding token)."""
        return _present({"bos_token": self.bos_id, "eos_token": self.eos_id})

    def save(self, out_dir):
        self._save_template(out_dir)
        lines = (base64.b64encode(t) + b" %d\n" % r for t, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        return atomic_write(Path(out_dir) / "tokenizer.model", b"".join(lines))


def llama3_special_name(i: int, names: str = "3.1") -> str:
    """Name of Llama 3 special token ``128000 + i`` under Llama ``names`` ("3.1": 3.1 and later, or "3.0")."""
    named = LLAMA3_NAMED_SPECIALS[names]
    if i in named:
        return named[i]
    return f"<|reserved_special_token_{i - sum(1 for k in named if k < i)}|>"


def llama3_names_of(path: Path) -> str:
    """Which Llama 3 special-token names fit the checkpoint around tokenizer.model ``path``: "3.1" or "3.0".

    The tiktoken file is identical for Llama 3.0 .. 3.3, so the checkpoint's config decides: Meta's
    ``params.json`` with ``use_scaled_rope`` (3.1+; llama_min's own params.json may carry the scaling as
    ``rope_freq_divisors``) or without (3.0), or an HF ``config.json`` with
    ``rope_scaling`` of type ``llama3`` (3.1+) or none at 8192 positions (3.0). Nothing beside: "3.1",
    the names of every release since July 2024 (under 3.0 those ids were reserved and never trained).
    """
    folders = [path.parent] + ([path.parent.parent] if path.parent.name == "original" else [])
    for folder in folders:
        if (folder / "params.json").is_file():
            params = read_json(folder / "params.json", "params.json")
            return "3.1" if params.get("use_scaled_rope") or params.get("rope_freq_divisors") else "3.0"
        if (folder / "config.json").is_file():
            config = read_json(folder / "config.json", "config.json")
            scaling = config.get("rope_scaling") or {}
            if scaling.get("rope_type", scaling.get("type")) == "llama3":
                return "3.1"
            if not scaling and config.get("max_position_embeddings") == 8192:
                return "3.0"
    return "3.1"


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
                raise LlamaMinError(f"{path}: line {n} is not 'base64 rank' (expected a tiktoken rank file)") \
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

    def __init__(self, tk, bos_id: int, eos_id: int, special_ids: dict[str, int] | None = None, **kw):
        """``special_ids``: ``{transformers name: id}`` of its other special tokens (``"unk_token"``,
        ``"pad_token"``, ...), as its files or GGUF named them; ``pad_token`` is also ``pad_id``."""
        self.tk = tk
        self.tk.encode_special_tokens = True   # special-token text in user input stays plain text
        self.named_ids = dict(special_ids or {})
        kw.setdefault("pad_id", self.named_ids.get("pad_token", -1))
        super().__init__(tk.get_vocab_size(with_added_tokens=True), bos_id, eos_id, **kw)

    def _encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, text):
        return self.tk.token_to_id(text)

    def _control_tokens(self):
        """Every added token (special or not): transformers splits a rendered chat on all of them."""
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}

    def special_token_ids(self) -> dict[str, int]:
        """``{transformers name: id}``: BOS, EOS, padding and the other special tokens its source named."""
        return _present({**self.named_ids, "bos_token": self.bos_id, "eos_token": self.eos_id,
                         "pad_token": self.pad_id})

    def save(self, out_dir):
        """tokenizer.json (with a BOS post-processor when it had none and adds BOS) + tokenizer_config.json."""
        templates = self.chat_templates
        template = templates.get("default") if list(templates) == ["default"] else \
            [{"name": k, "template": v} for k, v in templates.items()] or None
        config = hf_tokenizer_config(self, chat_template=template)
        atomic_write(Path(out_dir) / "tokenizer_config.json", json.dumps(config, indent=2).encode())
        return atomic_write(Path(out_dir) / "tokenizer.json", tokenizer_json(self.tk, self))


def load_tokenizer_json(path: Path, **kw) -> HFTokenizer:
    """``tokenizer.json`` + BOS/EOS/stop ids and chat template from the HF files beside it (when present)."""
    from tokenizers import Tokenizer as TkTokenizer

    whole_pieces = needs_whole_piece_rule(read_json(path, "tokenizer.json"))
    try:
        tk = TkTokenizer.from_file(str(path))
    except Exception as err:
        raise LlamaMinError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
    if whole_pieces:
        tk.model.ignore_merges = True
    configs = {n: _read_json_if_there(path.parent / n) for n in
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

    stops = [i for name in ("config.json", "generation_config.json")
             for i in _id_list(configs[name].get("eos_token_id"))]
    kw.setdefault("chat_templates", folder_templates(path))
    named = named_special_ids(tk, configs["tokenizer_config.json"], _read_json_if_there(
        path.parent / "special_tokens_map.json"), configs["config.json"])
    return HFTokenizer(tk, token("bos"), token("eos"), stop_ids=stops, special_ids=named,
                       default_system=chat.default_system_from_template(
                           configs["tokenizer_config.json"].get("chat_template")),
                       add_bos=configs["tokenizer_config.json"].get("add_bos_token"), **kw)


def named_special_ids(tk, tokenizer_config: dict, special_tokens_map: dict, config: dict) -> dict[str, int]:
    """``{transformers name: id}`` of the special tokens an HF folder names, as transformers reads them.

    A name (``"unk_token": "<unk>"`` or ``{"content": "<unk>", ...}``) comes from tokenizer_config.json,
    else the older special_tokens_map.json; a padding token named nowhere may be config.json's
    ``pad_token_id``. Names the vocabulary lacks are left out.
    """
    ids = {}
    for name in GGUF_SPECIAL_KEYS:
        text = tokenizer_config.get(name) or special_tokens_map.get(name)
        text = text.get("content") if isinstance(text, dict) else text
        i = tk.token_to_id(text) if isinstance(text, str) else None
        if i is not None:
            ids[name] = i
    pad = config.get("pad_token_id")
    if "pad_token" not in ids and type(pad) is int and 0 <= pad < tk.get_vocab_size(with_added_tokens=True):
        ids["pad_token"] = pad
    return ids


def needs_whole_piece_rule(data: dict) -> bool:
    """Whether a tokenizer.json is a Llama 3 BPE without ``ignore_merges`` (then llama_min turns it on).

    tiktoken looks a whole pre-token piece up in the vocabulary before merging: a piece that is a
    vocabulary entry is one token. Plain BPE only merges pairs in rank order, and for ~600 entries
    (``" việc"``, ``" jeho"``, mostly Vietnamese, Czech, Turkish, Persian words) that order never builds
    the whole word. The ``tokenizers`` option ``ignore_merges`` is that whole-piece lookup; Llama 3 files
    exported without it (older conversions) get it when the pre-tokenizer is Llama 3's split regex, so
    they encode exactly as Meta's tiktoken ``tokenizer.model``.
    """
    model = data.get("model")
    return isinstance(model, dict) and model.get("type") == "BPE" and not model.get("ignore_merges") \
        and _has_llama3_split(data.get("pre_tokenizer"))


def _has_llama3_split(pre) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        return any(_has_llama3_split(p) for p in pre.get("pretokenizers") or [])
    return pre.get("type") == "Split" and (pre.get("pattern") or {}).get("Regex") == LLAMA3_PATTERN


def _id_list(value) -> list[int]:
    """A config's ``eos_token_id``: an int, a list of ints, or absent."""
    if isinstance(value, int):
        return [value]
    return [i for i in value if isinstance(i, int)] if isinstance(value, list) else []


def _read_json_if_there(path: Path) -> dict:
    return read_json(path, path.name) if path.is_file() else {}


def folder_templates(tokenizer_file: Path) -> dict[str, str]:
    """The chat templates an HF folder ships beside ``tokenizer_file`` (as transformers finds them).

    ``chat_template.jinja`` (+ ``additional_chat_templates/NAME.jinja``) takes priority over
    ``tokenizer_config.json``'s ``chat_template``; a file in ``original/`` also looks one folder up.
    """
    folders = [tokenizer_file.parent]
    if tokenizer_file.parent.name == "original":
        folders.append(tokenizer_file.parent.parent)
    for folder in folders:
        templates = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        for extra in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            templates[extra.stem] = extra.read_text(encoding="utf-8")
        if not templates:
            config = _read_json_if_there(folder / "tokenizer_config.json")
            templates = chat.normalize_templates(config.get("chat_template"))
        if templates:
            return templates
    return {}


# ------------------------------------------------------------------------------------------------ GGUF

def load_gguf_tokenizer(path: Path, **kw) -> Tokenizer:
    """The tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` metadata (and its chat templates)."""
    meta = read_gguf_metadata(path, prefix="tokenizer.")
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise LlamaMinError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    bos = meta.get("tokenizer.ggml.bos_token_id", -1)
    eos = meta.get("tokenizer.ggml.eos_token_id", -1)
    templates = {("default" if k == "tokenizer.chat_template" else k.rpartition(".")[2]): v
                 for k, v in meta.items() if k.startswith("tokenizer.chat_template") and isinstance(v, str)}
    kw.setdefault("chat_templates", templates)
    kw.update(default_system=chat.default_system_from_template(meta.get("tokenizer.chat_template")),
              add_bos=gguf_add_bos(meta), special_ids=gguf_special_ids(meta),
              stop_ids=[meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta])
    if model == "llama":
        proto = spm_model_from_gguf_vocab(
            tokens, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.token_type"),
            bos_id=bos, eos_id=eos, unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
            pad_id=meta.get("tokenizer.ggml.padding_token_id", -1),
            add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
        return SentencePieceTokenizer(proto, bos, eos, name=str(path), **kw)
    if model == "gpt2":
        return HFTokenizer(hf_tokenizer_from_gguf(meta, name=str(path)), bos, eos, **kw)
    raise LlamaMinError(f"{path}: unsupported tokenizer.ggml.model {model!r} (expected 'llama' or 'gpt2')")


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

_SEARCH = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")


def find_tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file for a tokenizer file, a checkpoint dir, or a checkpoint file.

    A dir is searched for ``tokenizer.model`` (Meta, or HF with sentencepiece), ``tokenizer.json`` (HF),
    ``original/tokenizer.model`` (HF Llama 3 without a tokenizer.json), then a single ``*.gguf``; a ``.gguf``
    file carries its own; any other checkpoint file (``consolidated.00.pth``, ``model.safetensors``) means
    its dir. An HF Llama 3 folder thus uses its own ``tokenizer.json`` and chat template, not ``original/``.
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


def load_tokenizer(path: str | Path, chat_format: str | None = None,
                   chat_template: str | Path | None = None) -> Tokenizer:
    """Load the tokenizer of ``path``: a tokenizer file, a checkpoint dir, or a ``.gguf`` file.

    ``chat_format``: the default format for ``encode_dialog`` (``"template"``, ``"meta"``, ``"chatml"``;
    None: the checkpoint's template when it ships one, else the vocabulary's built-in format).
    ``chat_template``: a Jinja template (text, or a path to a ``.jinja`` file) replacing the checkpoint's.
    """
    from .llama2c import llama2c_tokenizer_file, spm_model_from_tokenizer_bin
    from ..files.hub import resolve_checkpoint

    kw = {"chat_format": chat_format}
    if chat_template is not None:
        kw["chat_templates"] = _template_arg(chat_template)
    path = resolve_checkpoint(path)  # hub ids and HF cache folders -> a local folder
    if (vocab := llama2c_tokenizer_file(path)) is not None:  # llama2.c's tokenizer.bin
        return SentencePieceTokenizer(spm_model_from_tokenizer_bin(vocab), name=str(vocab), **kw)
    path = find_tokenizer_file(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"GGUF"):
        return load_gguf_tokenizer(path, **kw)
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return load_tokenizer_json(path, **kw)
    kw.setdefault("chat_templates", folder_templates(path))
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return TiktokenTokenizer(read_tiktoken_ranks(path), names=llama3_names_of(path), **kw)
    if not head:
        raise LlamaMinError(f"{path}: empty file (expected a tokenizer.model, tokenizer.json or GGUF file)")
    try:
        return SentencePieceTokenizer(path.read_bytes(), name=str(path), **kw)
    except _NotSentencePiece:
        raise LlamaMinError(f"{path}: not a tokenizer (expected a sentencepiece or tiktoken tokenizer.model, "
                            "a tokenizer.json or a GGUF file)") from None


def _template_arg(template: str | Path) -> dict[str, str]:
    """``chat_template=`` of load_tokenizer: Jinja text, or the path of a ``.jinja`` file."""
    if isinstance(template, Path) or (isinstance(template, str) and template.endswith(".jinja")
                                      and "{" not in template):
        path = Path(template).expanduser()
        if not path.is_file():
            raise LlamaMinError(f"chat_template {str(template)!r}: no such .jinja file")
        return {"default": path.read_text(encoding="utf-8")}
    return chat.normalize_templates(template)


# --------------------------------------------------------------------------------------- tokenizers


def tokenizer_files(tok, source) -> dict:
    """The files that carry `tok` (loaded from `source`) into a checkpoint dir: {file name: bytes}.

    Names are the ones `load_tokenizer(dir)` looks for: a sentencepiece or tiktoken file becomes
    `tokenizer.model`, a tokenizer.json keeps its config files beside it; a tokenizer that lives inside
    a GGUF file is written out (`gguf_tokenizer_files`).
    """
    src = find_tokenizer_file(source)
    data = src.read_bytes()
    if data[:4] != b"GGUF":
        if tok.kind != "tokenizers":
            return {"tokenizer.model": data, **_template_file(tok)}
        side = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja")
        return {"tokenizer.json": data, **{n: (src.parent / n).read_bytes() for n in side if (src.parent / n).is_file()}}
    return {**gguf_tokenizer_files(tok, src), **(_template_file(tok) if tok.kind == "sentencepiece" else {})}


def _present(ids: dict) -> dict[str, int]:
    """The entries of ``{name: id}`` that are real ids (not None or -1)."""
    return {name: int(i) for name, i in ids.items() if i is not None and i >= 0}


def _template_file(tok) -> dict:
    """The chat template beside a tokenizer.model, as `load_tokenizer` finds it: chat_template.jinja."""
    return {"chat_template.jinja": tok.chat_template.encode("utf-8")} if tok.chat_template else {}
