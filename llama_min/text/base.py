"""The tokenizer interface every backend implements, and the streaming decoder that works with any of them.

  Tokenizer       encode/decode, BOS/EOS/stop ids, chat formats and templates (llama_min.text.chat), save
  StreamDecoder   ids -> printable text as they arrive, never half a UTF-8 character

The backends (sentencepiece, tiktoken, tokenizer.json, GGUF vocabularies) and `load_tokenizer` are in
tokenizer.py.
"""

from __future__ import annotations

from pathlib import Path

from . import chat
from ..errors import LlamaMinError
from ..files import atomic_write


class Tokenizer:
    """The common interface; subclasses implement ``_encode``, ``decode``, ``token_id`` and ``_control_tokens``.

    Attributes: ``bos_id``, ``eos_id`` (ints, -1 when the vocabulary has none), ``stop_ids`` (generation
    stops on any of them), ``n_words`` (vocabulary size including special tokens), ``pad_id`` (-1: none),
    ``chat_templates`` (``{name: Jinja text}``, empty when the checkpoint ships none), ``chat_format`` (the
    default: ``"template"`` when there is a template, else the vocabulary's built-in ``builtin_format``:
    ``"llama3"``, ``"llama2"`` or ``"chatml"``), ``default_system`` (a system prompt the ChatML format adds
    when a dialog has none, or None), ``add_bos`` (whether plain text is fed after a BOS: true for Llama,
    false for SmolLM2's ChatML vocabulary), ``kind`` (the backend).
    """

    kind = "?"

    def __init__(self, n_words: int, bos_id: int, eos_id: int, stop_ids=(), pad_id: int = -1,
                 default_system: str | None = None, add_bos: bool | None = None, chat_templates=None,
                 chat_format: str | None = None):
        self.n_words, self.bos_id, self.eos_id, self.pad_id = n_words, bos_id, eos_id, pad_id
        self.default_system, self._controls = default_system, None
        self.chat_templates = chat.normalize_templates(chat_templates)
        self.builtin_format = chat.detect_format(self)
        self.chat_format = "template" if self.chat_templates else self.builtin_format
        self.chat_format = chat.resolve_format(self, chat_format)
        self.add_bos = bos_id >= 0 and (self.builtin_format != "chatml" if add_bos is None else bool(add_bos))
        self.stop_ids = {i for i in [eos_id, *stop_ids, *chat.stop_ids(self)] if i is not None and i >= 0}

    @property
    def chat_template(self) -> str | None:
        """The default chat template's text (None without one)."""
        t = self.chat_templates
        return t.get("default") or (next(iter(t.values())) if len(t) == 1 else None)

    @property
    def control_tokens(self) -> dict[str, int]:
        """``{text: id}`` of the special tokens a chat template's own text may spell (``"<|eot_id|>"``)."""
        if self._controls is None:
            self._controls = self._control_tokens()
        return self._controls

    def special_token_texts(self) -> dict[str, str]:
        """``bos_token`` / ``eos_token`` strings for chat templates (only those the vocabulary has)."""
        names = {v: k for k, v in self.control_tokens.items()}
        return {key: names[i] for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)) if i in names}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token-looking text stays plain), with BOS/EOS ids if asked."""
        for asked, i, name in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if asked and i < 0:
                raise LlamaMinError(f"this tokenizer has no {name} token")
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _control_tokens(self) -> dict[str, int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> int | None:
        """Id of the single token spelled ``text`` (e.g. ``"<|eot_id|>"``), or None if there is none."""
        raise NotImplementedError

    def encode_dialog(self, dialog: list[dict], add_generation_prompt: bool = True,
                      continue_final_message: bool = False, chat_format: str | None = None,
                      **template_vars) -> list[int]:
        """Ids of a chat (see ``llama_min.text.chat``): the checkpoint's template, or ``chat_format=`` one of
        ``"template"``, ``"meta"``, ``"chatml"`` (``"llama3"``, ``"llama2"``). ``add_generation_prompt`` opens
        the assistant's turn; ``continue_final_message`` leaves the last message open (prefill);
        ``template_vars`` (``date_string=``, ``tools=``, ...) go to the template. ``open_assistant=`` is the
        older name of ``add_generation_prompt``."""
        add_generation_prompt = template_vars.pop("open_assistant", add_generation_prompt)
        return chat.encode_dialog(self, dialog, add_generation_prompt, continue_final_message, chat_format,
                                  **template_vars)

    def encode_followup(self, messages: list[dict], add_generation_prompt: bool = True,
                        chat_format: str | None = None, **template_vars) -> list[int]:
        """Ids that close a just-generated assistant reply and append ``messages`` (see ``llama_min.text.chat``)."""
        add_generation_prompt = template_vars.pop("open_assistant", add_generation_prompt)
        return chat.encode_followup(self, messages, add_generation_prompt, chat_format, **template_vars)

    def save(self, out_dir: str | Path) -> Path:
        """Write this tokenizer into ``out_dir`` in its backend's file format (atomically); return the file.

        sentencepiece and tiktoken: ``tokenizer.model`` (+ ``chat_template.jinja`` when there is a template);
        tokenizers: ``tokenizer.json`` plus a ``tokenizer_config.json`` with BOS/EOS, ``add_bos_token`` and
        the chat template. ``load_tokenizer`` on the dir gives the same tokenizer back (a GGUF vocabulary
        thus becomes a plain file).
        """
        raise NotImplementedError

    def _save_template(self, out_dir: Path) -> None:
        if self.chat_template is not None:
            atomic_write(Path(out_dir) / "chat_template.jinja", self.chat_template.encode("utf-8"))

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
