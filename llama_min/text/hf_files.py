"""A llama_min tokenizer as the files of a Hugging Face folder, so that transformers reads what llama_min does.

  gguf_tokenizer_files   a tokenizer living inside a GGUF file -> tokenizer.json, tokenizer_config.json,
                         special_tokens_map.json (+ tokenizer.model for a sentencepiece vocab)
  tokenizer_json         tokenizer.json bytes, with a BOS/EOS post-processor where the file had none
  hf_tokenizer_config    tokenizer_config.json: class, special-token names, add_bos/add_eos, chat template
  special_token_names    ``{"bos_token": "<s>", "unk_token": "<unk>", ...}`` of a tokenizer

transformers' fast tokenizers take BOS/EOS from tokenizer.json's post-processor (transformers 5 drops
``add_bos_token`` from tokenizer_config.json when a tokenizer.json is there) and the special tokens' names from
tokenizer_config.json (older readers: special_tokens_map.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files.gguf import read_gguf_metadata
from .gguf_vocab import bos_eos_post_processor, gguf_add_eos, hf_tokenizer_from_spm_vocab


def gguf_tokenizer_files(tok, gguf_path: Path) -> dict:
    """The files of a tokenizer that lives inside a GGUF file, as an HF folder has them: {file name: bytes}.

    tokenizer.json with a post-processor adding BOS/EOS as the GGUF says (`gguf_add_bos`; transformers reads
    them from there), a sentencepiece vocab's tokenizer.model too (llama_min loads that first), and tokenizer_config.json + special_tokens_map.json naming every
    special token the GGUF names (BOS, EOS, unknown, padding, ...), where transformers looks for them.
    """
    meta = read_gguf_metadata(gguf_path, prefix="tokenizer.")
    add_eos, template = gguf_add_eos(meta), None
    if tok.kind == "sentencepiece":
        tk = hf_tokenizer_from_spm_vocab(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores"),
                                         meta["tokenizer.ggml.token_type"], unk_id=tok.sp.unk_id(),
                                         add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
        files = {"tokenizer.model": tok.sp.serialized_model_proto()}
    else:
        tk, files, template = tok.tk, {}, meta.get("tokenizer.chat_template")
    config = hf_tokenizer_config(tok, add_eos=add_eos, chat_template=template)
    return {**files, "tokenizer.json": tokenizer_json(tk, tok, add_eos),
            "tokenizer_config.json": json.dumps(config, indent=2).encode(),
            "special_tokens_map.json": json.dumps(special_token_names(tok), indent=2).encode()}


def special_token_names(tok) -> dict[str, str]:
    """``{transformers name: token text}`` of `tok`'s special tokens (``{"bos_token": "<s>", ...}``)."""
    if tok.kind == "sentencepiece":
        text = tok.sp.id_to_piece
    elif tok.kind == "tokenizers":
        text = tok.tk.id_to_token
    else:
        text = {i: t for t, i in tok.control_tokens.items()}.get
    names = {name: text(i) for name, i in tok.special_token_ids().items()}
    return {name: t for name, t in names.items() if t is not None}


def hf_tokenizer_config(tok, add_eos: bool = False, chat_template=None) -> dict:
    """tokenizer_config.json for `tok` written as a tokenizer.json: the generic fast-tokenizer class (so
    transformers uses the file as it is), the special tokens' names, add_bos/add_eos and the chat template."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_token_names(tok),
              "add_bos_token": bool(tok.add_bos), "add_eos_token": bool(add_eos)}
    if chat_template:
        config["chat_template"] = chat_template
    return config


def tokenizer_json(tk, tok, add_eos: bool = False) -> bytes:
    """`tk` (a ``tokenizers.Tokenizer`` with `tok`'s vocabulary) as tokenizer.json bytes.

    When it has no post-processor, one is added that puts BOS first when `tok.add_bos` and EOS last when
    `add_eos`: transformers' fast tokenizers take BOS/EOS from there, not from tokenizer_config.json.
    A post-processor the file already had (Meta's Llama 3 TemplateProcessing, GPT-2's ByteLevel) stays.
    """
    bos = (tk.id_to_token(tok.bos_id), tok.bos_id) if tok.add_bos else None
    eos = (tk.id_to_token(tok.eos_id), tok.eos_id) if add_eos and tok.eos_id >= 0 else None
    if tk.post_processor is not None or not (bos or eos):
        return tk.to_str().encode()
    data = json.loads(tk.to_str())
    data["post_processor"] = bos_eos_post_processor(bos, eos)
    return json.dumps(data, ensure_ascii=False).encode()
