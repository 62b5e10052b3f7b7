"""Chat formats: a dialog (``[{"role": ..., "content": ...}, ...]``) to token ids.

The format follows the vocabulary (``detect_format``):

- **llama3** (has ``<|start_header_id|>`` and ``<|eot_id|>``): ``<|begin_of_text|>``, then per message
  ``<|start_header_id|>{role}<|end_header_id|>`` ``"\\n\\n"`` ``{content.strip()}`` ``<|eot_id|>``, then an
  open ``assistant`` header. Stops on ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>`` (those present).
- **chatml** (has ``<|im_start|>`` and ``<|im_end|>``, e.g. SmolLM2): per message
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, open turn ``<|im_start|>assistant\\n``; stops on
  ``<|im_end|>``. No BOS. A dialog without a system message gets the template's default one (SmolLM2:
  "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), as its chat template does.
- **llama2** (anything else, e.g. sentencepiece vocabularies): each finished (user, assistant) pair is its
  own sequence ``BOS "[INST] {user} [/INST] {assistant} " EOS``, the open turn ``BOS "[INST] {user} [/INST]"``
  (contents stripped); a system message is folded into the first user message as
  ``"<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"``. Roles must alternate user/assistant. Stops on EOS.

Special tokens are inserted as ids; message text is encoded as plain text, so a user typing
``"<|eot_id|>"`` gets the characters, not the token.

**Continuing a dialog** (a chat REPL that keeps its KV cache): after generating the reply ids ``r`` for
``ids = encode_dialog(d)``, feed ``encode_followup(new_messages)``: it first closes the reply (llama3:
``<|eot_id|>``; chatml: ``<|im_end|>`` ``"\\n"``; llama2: the ids of the trailing space, then EOS, so do not
feed the sampled stop token yourself), then encodes the new messages and opens the next assistant turn.
For every format, when the reply text ``a`` has no surrounding whitespace and ``r == tok.encode(a)``::

    encode_dialog(d) + r + encode_followup(new) == encode_dialog(d + [{"role": "assistant", "content": a}] + new)
"""

from __future__ import annotations

import re

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def detect_format(tok) -> str:
    """``"llama3"``, ``"chatml"`` or ``"llama2"``, from the special tokens the vocabulary has."""
    if tok.token_id("<|start_header_id|>") is not None and tok.token_id("<|eot_id|>") is not None:
        return "llama3"
    if tok.token_id("<|im_start|>") is not None and tok.token_id("<|im_end|>") is not None:
        return "chatml"
    return "llama2"


def stop_ids(tok) -> set[int]:
    """Ids that end an assistant turn in ``tok``'s chat format (besides ``tok.eos_id``)."""
    names = {"llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "chatml": ["<|im_end|>"]}
    ids = (tok.token_id(n) for n in names.get(tok.chat_format, []))
    return {i for i in ids if i is not None}


def default_system_from_template(template) -> str | None:
    """The system prompt a ChatML Jinja template inserts when a dialog has none (SmolLM2's does)."""
    if not isinstance(template, str):
        return None
    m = re.search(r"!= 'system' %\}\{\{ '<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
    return m.group(1) if m else None


def encode_dialog(tok, dialog: list[dict], open_assistant: bool = True) -> list[int]:
    """Ids of ``dialog`` in ``tok``'s format; ``open_assistant`` adds the header the reply follows
    (llama3/chatml; Llama 2 has no assistant header: a dialog ending with a user message is open)."""
    _check(dialog)
    if tok.chat_format == "llama3":
        ids = [tok.bos_id] + [i for m in dialog for i in _llama3_message(tok, m)]
        return ids + (_llama3_header(tok, "assistant") if open_assistant else [])
    if tok.chat_format == "chatml":
        if tok.default_system and dialog and dialog[0]["role"] != "system":
            dialog = [{"role": "system", "content": tok.default_system}] + list(dialog)
        ids = [i for m in dialog for i in _chatml_message(tok, m)]
        return ids + (_chatml_open(tok) if open_assistant else [])
    return _llama2_turns(tok, _fold_system(dialog))


def encode_followup(tok, messages: list[dict], open_assistant: bool = True) -> list[int]:
    """Ids to append after a just-generated assistant reply: its closing, ``messages``, the open turn."""
    _check(messages)
    if tok.chat_format == "llama3":
        ids = [tok.token_id("<|eot_id|>")] + [i for m in messages for i in _llama3_message(tok, m)]
        return ids + (_llama3_header(tok, "assistant") if open_assistant else [])
    if tok.chat_format == "chatml":
        ids = [tok.token_id("<|im_end|>")] + tok.encode("\n")
        ids += [i for m in messages for i in _chatml_message(tok, m)]
        return ids + (_chatml_open(tok) if open_assistant else [])
    if messages and messages[0]["role"] == "system":
        raise ValueError("llama2 chat: a system message can only open the dialog")
    trailing_space = tok.encode("a ")[len(tok.encode("a")):]
    return trailing_space + [tok.eos_id] + _llama2_turns(tok, messages)


def _check(dialog) -> None:
    for n, m in enumerate(dialog):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"dialog message {n}: expected a dict with str 'role' and 'content', got {m!r}")


# ------------------------------------------------------------------------------------------- Llama 3


def _llama3_header(tok, role: str) -> list[int]:
    return [tok.token_id("<|start_header_id|>")] + tok.encode(role) + [tok.token_id("<|end_header_id|>")] \
        + tok.encode("\n\n")


def _llama3_message(tok, message: dict) -> list[int]:
    return _llama3_header(tok, message["role"]) + tok.encode(message["content"].strip()) \
        + [tok.token_id("<|eot_id|>")]


# -------------------------------------------------------------------------------------------- ChatML


def _chatml_message(tok, message: dict) -> list[int]:
    return [tok.token_id("<|im_start|>")] + tok.encode(f"{message['role']}\n{message['content']}") \
        + [tok.token_id("<|im_end|>")] + tok.encode("\n")


def _chatml_open(tok) -> list[int]:
    return [tok.token_id("<|im_start|>")] + tok.encode("assistant\n")


# ------------------------------------------------------------------------------------------- Llama 2


def _fold_system(dialog: list[dict]) -> list[dict]:
    """Llama 2 has no system turn: put ``<<SYS>>`` ... ``<</SYS>>`` in front of the first user message."""
    if not dialog or dialog[0]["role"] != "system":
        return list(dialog)
    if len(dialog) < 2:
        raise ValueError("llama2 chat: a system message must be followed by a user message")
    first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    return [first] + list(dialog[2:])


def _llama2_turns(tok, dialog: list[dict]) -> list[int]:
    """``BOS [INST] u [/INST] a  EOS`` per finished pair, then ``BOS [INST] u [/INST]`` if a user is last."""
    for n, m in enumerate(dialog):
        want = "user" if n % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"llama2 chat: message {n} has role {m['role']!r}, expected {want!r} "
                             "(an optional system message, then user/assistant alternating)")
    ids = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tok.encode(text, bos=True, eos=True)
    if len(dialog) % 2 == 1:
        ids += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids
