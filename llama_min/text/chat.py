"""Chat formats: a dialog (``[{"role": ..., "content": ...}, ...]``) to token ids.

Which format (``tok.chat_format``, or ``chat_format=`` on ``load_tokenizer`` / ``encode_dialog``):

- **template**: the checkpoint's own Jinja chat template (HF ``chat_template.jinja`` or
  ``tokenizer_config.json`` ``chat_template``; GGUF ``tokenizer.chat_template``). The default whenever the
  checkpoint ships one. Rendered as transformers' ``apply_chat_template`` renders it (see *Templates* below).
- **meta** (resolves to ``llama3`` or ``llama2`` by vocabulary): Meta's reference formats, the default for a
  ``tokenizer.model`` without a template (a Meta folder):

  - **llama3** (has ``<|start_header_id|>`` and ``<|eot_id|>``): ``<|begin_of_text|>``, then per message
    ``<|start_header_id|>{role}<|end_header_id|>`` ``"\\n\\n"`` ``{content.strip()}`` ``<|eot_id|>``, then an
    open ``assistant`` header. No "Cutting Knowledge Date" system lines (those come from HF templates).
  - **llama2** (anything else, e.g. sentencepiece vocabularies): each finished (user, assistant) pair is its
    own sequence ``BOS "[INST] {user} [/INST] {assistant} " EOS``, the open turn ``BOS "[INST] {user} [/INST]"``
    (contents stripped); a system message is folded into the first user message as
    ``"<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"``. Roles must alternate user/assistant.
- **chatml** (has ``<|im_start|>`` and ``<|im_end|>``, e.g. SmolLM2): per message
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, open turn ``<|im_start|>assistant\\n``. No BOS. A dialog
  without a system message gets the template's default one (SmolLM2: "You are a helpful AI assistant named
  SmolLM, trained by Hugging Face"), as its chat template does.

Stop ids follow the vocabulary, whatever the format: Llama 3 vocabularies stop on ``<|end_of_text|>``,
``<|eom_id|>``, ``<|eot_id|>`` (those present), ChatML ones on ``<|im_end|>``, all on EOS and on the ids the
checkpoint's config lists as EOS.

``add_generation_prompt`` adds the header the reply follows (Llama 2 has none: a dialog ending with a user
message is open). ``continue_final_message`` leaves the last message open instead (assistant prefill: the
model continues ``"Sure, here is"``): no closing tokens after it, no new header.

**Message text stays text.** Special tokens come only from the format or the template's own text; a user
who types ``"<|eot_id|>"`` gets those characters, encoded as plain text.

**Templates.** Rendered in jinja2's ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)``
with ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None unless given), ``bos_token``,
``eos_token``, the caller's extra variables (``date_string``, ``tools``, ...), the functions
``raise_exception(msg)`` and ``strftime_now(fmt)``, and a ``tojson`` filter that keeps non-ASCII text
(``json.dumps(x, ensure_ascii=False, ...)``). A template list ``[{"name", "template"}]`` uses ``"default"``
(``"tool_use"`` when ``tools`` is given and the checkpoint has one). To keep message text plain, every
special-token string inside the caller's strings is wrapped in two Unicode noncharacters (U+FDD0 .. U+FDD1)
before rendering; after rendering the wraps are removed and their spans protected. The rendered text is
then split at the special-token strings outside protected spans (those become their ids) and every piece
between them is encoded as plain text. A dialog with no special-token text in it thus gives exactly
transformers' ids; with such text, transformers (by default) turns it into control tokens, llama_min does
not, and encodes such a message exactly as ``tok.encode(text)`` would. (Caller strings lose any
U+FDD0..U+FDD3 they contain.) With a sentencepiece vocabulary each piece after a special token gets
sentencepiece's leading-space marker, as Meta's Llama 2 format has it after BOS.

**Continuing a dialog** (a chat REPL that keeps its KV cache, or training data built turn by turn): after
generating the reply ids ``r`` for ``ids = encode_dialog(d)``, feed ``encode_followup(new_messages)``: it
first closes the reply (llama3: ``<|eot_id|>``; chatml: ``<|im_end|>`` ``"\\n"``; llama2: the ids of the
trailing space, then EOS, so do not feed the sampled stop token yourself; template: whatever the template
writes after an assistant message), then encodes the new messages and opens the next assistant turn. When
the reply text ``a`` has no surrounding whitespace, ``r == tok.encode(a)`` and (for templates) the template
writes a special token right after a reply and renders earlier turns the same whatever follows::

    encode_dialog(d) + r + encode_followup(new) == encode_dialog(d + [{"role": "assistant", "content": a}] + new)
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from ..errors import EnvironmentFailure, LlamaMinError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CHOICES = ("template", "meta", "chatml", "llama3", "llama2")
# Unicode noncharacters (reserved for a program's internal use): wraps around special-token text in the
# caller's strings, the end of the message to continue, and a stand-in reply for encode_followup
_START, _END, _CONTINUE, _REPLY = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"
_WRAPPED = re.compile(f"{_START}([^{_START}{_END}]*){_END}|[{_START}{_END}]")


def detect_format(tok) -> str:
    """The built-in format of ``tok``'s vocabulary: ``"llama3"``, ``"chatml"`` or ``"llama2"``."""
    if tok.token_id("<|start_header_id|>") is not None and tok.token_id("<|eot_id|>") is not None:
        return "llama3"
    if tok.token_id("<|im_start|>") is not None and tok.token_id("<|im_end|>") is not None:
        return "chatml"
    return "llama2"


def resolve_format(tok, choice: str | None) -> str:
    """The format a request means: ``None`` -> ``tok.chat_format``; ``"meta"`` -> llama3 or llama2."""
    if choice is None:
        return tok.chat_format
    if choice not in CHOICES:
        raise LlamaMinError(f"chat_format {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "template" and not tok.chat_templates:
        raise LlamaMinError("chat_format 'template': this tokenizer has no chat template (none in "
                            "tokenizer_config.json, chat_template.jinja or the GGUF; pass chat_template=)")
    if choice == "meta":
        return "llama3" if tok.builtin_format == "llama3" else "llama2"
    if choice in ("chatml", "llama3") and detect_format(tok) != choice:
        need = "<|im_start|> and <|im_end|>" if choice == "chatml" else "<|start_header_id|> and <|eot_id|>"
        raise LlamaMinError(f"chat_format {choice!r}: the vocabulary has no {need} tokens")
    return choice


def stop_ids(tok) -> set[int]:
    """Ids that end an assistant turn for ``tok``'s vocabulary (besides its EOS and configured stops)."""
    names = {"llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "chatml": ["<|im_end|>"]}
    ids = (tok.token_id(n) for n in names.get(tok.builtin_format, []))
    return {i for i in ids if i is not None}


def default_system_from_template(template) -> str | None:
    """The system prompt a ChatML Jinja template inserts when a dialog has none (SmolLM2's does)."""
    if not isinstance(template, str):
        return None
    m = re.search(r"!= 'system' %\}\{\{ '<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
    return m.group(1) if m else None


def normalize_templates(template) -> dict[str, str]:
    """``{name: text}`` from a template string, a ``[{"name", "template"}, ...]`` list, or a dict."""
    if not template:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, dict):
        return {str(k): v for k, v in template.items() if isinstance(v, str)}
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                          for t in template):
        return {str(t.get("name", "default")): t["template"] for t in template}
    raise LlamaMinError(f"chat_template: expected a string or a list of {{name, template}}, got {template!r:.80}")


def encode_dialog(tok, dialog: list[dict], add_generation_prompt: bool = True,
                  continue_final_message: bool = False, chat_format: str | None = None, **template_vars) -> list[int]:
    """Ids of ``dialog`` in the requested (default: the tokenizer's) chat format."""
    fmt = resolve_format(tok, chat_format)
    _check(dialog, needs_text=fmt != "template")
    if continue_final_message:
        if not dialog or not isinstance(dialog[-1].get("content"), str):
            raise LlamaMinError("continue_final_message: the last message needs a string 'content' to continue")
        add_generation_prompt = False
    if fmt == "template":
        text = render_template(tok, dialog, add_generation_prompt, continue_final_message, template_vars)
        return encode_rendered(tok, text)
    _no_template_vars(fmt, template_vars)
    if continue_final_message and dialog[-1]["role"] != "assistant":
        raise LlamaMinError(f"continue_final_message: the {fmt} format continues an assistant message, "
                            f"but the last message has role {dialog[-1]['role']!r}")
    if fmt == "llama3":
        return _llama3(tok, dialog, add_generation_prompt, continue_final_message)
    if fmt == "chatml":
        return _chatml(tok, dialog, add_generation_prompt, continue_final_message)
    return _llama2_turns(tok, _fold_system(dialog), continue_final_message)


def encode_followup(tok, messages: list[dict], add_generation_prompt: bool = True,
                    chat_format: str | None = None, **template_vars) -> list[int]:
    """Ids to append after a just-generated assistant reply: its closing, ``messages``, the open turn."""
    fmt = resolve_format(tok, chat_format)
    _check(messages, needs_text=fmt != "template")
    if fmt == "template":
        return _template_followup(tok, messages, add_generation_prompt, template_vars)
    _no_template_vars(fmt, template_vars)
    if fmt == "llama3":
        ids = [tok.token_id("<|eot_id|>")] + [i for m in messages for i in _llama3_message(tok, m)]
        return ids + (_llama3_header(tok, "assistant") if add_generation_prompt else [])
    if fmt == "chatml":
        ids = [tok.token_id("<|im_end|>")] + tok.encode("\n")
        ids += [i for m in messages for i in _chatml_message(tok, m)]
        return ids + (_chatml_open(tok) if add_generation_prompt else [])
    if messages and messages[0]["role"] == "system":
        raise LlamaMinError("llama2 chat: a system message can only open the dialog")
    trailing_space = tok.encode("a ")[len(tok.encode("a")):]
    return trailing_space + [tok.eos_id] + _llama2_turns(tok, messages)


def _check(dialog, needs_text: bool = True) -> None:
    for n, m in enumerate(dialog):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str) or not needs_text)):
            raise LlamaMinError(f"dialog message {n}: expected a dict with str 'role' and 'content', got {m!r:.200}")


def _no_template_vars(fmt: str, template_vars: dict) -> None:
    if template_vars:
        raise LlamaMinError(f"template variables {', '.join(sorted(template_vars))} need chat_format='template' "
                            f"(this dialog uses the built-in {fmt} format)")


# ------------------------------------------------------------------------------------------ templates


def render_template(tok, dialog: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_vars: dict | None = None) -> str:
    """The template's text for ``dialog``, special-token text from the caller wrapped in U+FDD0..U+FDD1.

    With ``continue_final_message`` the text is cut right after the last message's content, as
    transformers cuts it (trailing whitespace the template trims stays trimmed).
    """
    template_vars = dict(template_vars or {})
    specials = control_pattern(tok)
    messages = _caller_messages(dialog, specials)
    if continue_final_message:
        messages[-1]["content"] += _CONTINUE + " "
    text = _render(tok, messages, add_generation_prompt, _wrap(template_vars, specials))
    if continue_final_message:
        at = text.rfind(_CONTINUE)
        if at < 0:
            raise LlamaMinError("continue_final_message: the chat template drops the last message's content, "
                                "so there is nothing to continue")
        text = text[:at] if text.startswith(_CONTINUE + " ", at) else text[:at].rstrip()
    return text


def _render(tok, messages: list[dict], add_generation_prompt: bool, template_vars: dict) -> str:
    import jinja2

    tools = template_vars.get("tools")
    variables = {"tools": None, "documents": None, **tok.special_token_texts(), **template_vars}
    try:
        return _compile(_pick_template(tok, tools)).render(
            messages=messages, add_generation_prompt=bool(add_generation_prompt), **variables)
    except (jinja2.TemplateError, TypeError) as err:
        raise LlamaMinError(f"chat template: {err}") from None


def _pick_template(tok, tools) -> str:
    templates = tok.chat_templates
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if len(templates) == 1:
        return next(iter(templates.values()))
    raise LlamaMinError(f"chat template: several templates ({', '.join(sorted(templates))}) and no 'default'")


def encode_rendered(tok, text: str) -> list[int]:
    """Ids of rendered chat text: special-token strings as ids, except inside the caller's (wrapped) text."""
    plain, protected, breaks = _unwrap(text)
    ids, pos = [], 0
    for start, end in _control_spans(tok, plain, protected, breaks):
        if start > pos:
            ids += tok.encode(plain[pos:start])
        ids.append(tok.control_tokens[plain[start:end]])
        pos = end
    return ids + (tok.encode(plain[pos:]) if pos < len(plain) else [])


def control_pattern(tok) -> re.Pattern:
    """A regex matching any of ``tok``'s special-token strings, longest first."""
    return _alternation(tuple(sorted(tok.control_tokens, key=len, reverse=True)))


@lru_cache(maxsize=8)
def _alternation(texts: tuple) -> re.Pattern:
    return re.compile("|".join(map(re.escape, texts)) or "(?!)")


def _wrap(obj, specials: re.Pattern):
    """Caller data with every special-token string in its str values wrapped as U+FDD0 token U+FDD1."""
    if isinstance(obj, str):
        obj = obj.translate({ord(c): None for c in (_START, _END, _CONTINUE, _REPLY)})
        return specials.sub(lambda m: _START + m.group() + _END, obj)
    if isinstance(obj, dict):
        return {k: _wrap(v, specials) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_wrap(v, specials) for v in obj]
    return obj


def _caller_messages(dialog: list[dict], specials: re.Pattern) -> list[dict]:
    """Fresh copies of the messages, keys with value None dropped (as transformers does), text wrapped."""
    return [_wrap({k: v for k, v in m.items() if v is not None}, specials) for m in dialog]


def _unwrap(text: str):
    """(text without wraps, [(start, end) of wrapped text], [positions of lone wrap marks])."""
    out, protected, breaks, pos, n = [], [], [], 0, 0
    for m in _WRAPPED.finditer(text):
        out.append(text[pos:m.start()])
        n += m.start() - pos
        if m.group(1) is None:           # a lone mark (the template cut a wrap apart): text may not join across
            breaks.append(n)
        else:
            protected.append((n, n + len(m.group(1))))
            out.append(m.group(1))
            n += len(m.group(1))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), protected, breaks


def _control_spans(tok, text: str, protected: list, breaks: list):
    """(start, end) of each special-token string in ``text`` outside protected spans, left to right."""
    pattern, pos = control_pattern(tok), 0
    while (m := pattern.search(text, pos)) is not None:
        s, e = m.span()
        if any(a < e and s < b for a, b in protected) or any(s < x < e for x in breaks):
            pos = s + 1
            continue
        yield s, e
        pos = e


def _template_followup(tok, messages, add_generation_prompt, template_vars) -> list[int]:
    """The template's text after an assistant reply: render a stand-in history + reply + ``messages``."""
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY}]
    specials = control_pattern(tok)
    rendered = _render(tok, history + _caller_messages(messages, specials), add_generation_prompt,
                       _wrap(template_vars, specials))
    at = rendered.rfind(_REPLY)
    if at < 0:
        raise LlamaMinError("chat template: it drops assistant messages, so a dialog cannot be continued "
                            "turn by turn (encode the whole dialog with encode_dialog instead)")
    return encode_rendered(tok, rendered[at + 1:])


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in a sandbox, with transformers' helpers (tojson, raise_exception, strftime_now)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EnvironmentFailure("chat templates need the jinja2 package: pip install 'jinja2>=3.1.6'") from None

    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise LlamaMinError(f"chat templates need jinja2>=3.1.6 (older sandboxes can be escaped); "
                            f"found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise LlamaMinError(f"chat template: syntax error on line {err.lineno}: {err.message}") from None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """Jinja's ``tojson`` as chat templates expect it: plain ``json.dumps`` (no HTML escaping)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=1)
def _generation_tag():
    """A jinja2 extension for ``{% generation %}...{% endgeneration %}`` (marks assistant text): renders the body."""
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


# ------------------------------------------------------------------------------------------- Llama 3


def _llama3(tok, dialog, add_generation_prompt: bool, continue_final: bool) -> list[int]:
    ids = [tok.bos_id] + [i for m in dialog[:len(dialog) - continue_final] for i in _llama3_message(tok, m)]
    if continue_final:
        return ids + _llama3_header(tok, dialog[-1]["role"]) + tok.encode(dialog[-1]["content"].strip())
    return ids + (_llama3_header(tok, "assistant") if add_generation_prompt else [])


def _llama3_header(tok, role: str) -> list[int]:
    return [tok.token_id("<|start_header_id|>")] + tok.encode(role) + [tok.token_id("<|end_header_id|>")] \
        + tok.encode("\n\n")


def _llama3_message(tok, message: dict) -> list[int]:
    return _llama3_header(tok, message["role"]) + tok.encode(message["content"].strip()) \
        + [tok.token_id("<|eot_id|>")]


# -------------------------------------------------------------------------------------------- ChatML


def _chatml(tok, dialog, add_generation_prompt: bool, continue_final: bool) -> list[int]:
    if tok.default_system and dialog and dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": tok.default_system}] + list(dialog)
    ids = [i for m in dialog[:len(dialog) - continue_final] for i in _chatml_message(tok, m)]
    if continue_final:
        return ids + [tok.token_id("<|im_start|>")] + tok.encode(f"{dialog[-1]['role']}\n{dialog[-1]['content']}")
    return ids + (_chatml_open(tok) if add_generation_prompt else [])


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
        raise LlamaMinError("llama2 chat: a system message must be followed by a user message")
    first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    return [first] + list(dialog[2:])


def _llama2_turns(tok, dialog: list[dict], continue_final: bool = False) -> list[int]:
    """``BOS [INST] u [/INST] a  EOS`` per finished pair, then ``BOS [INST] u [/INST]`` if a user is last.

    ``continue_final``: the last (assistant) answer stays open: ``BOS [INST] u [/INST] a`` without " " EOS.
    """
    for n, m in enumerate(dialog):
        want = "user" if n % 2 == 0 else "assistant"
        if m["role"] != want:
            raise LlamaMinError(f"llama2 chat: message {n} has role {m['role']!r}, expected {want!r} "
                                "(an optional system message, then user/assistant alternating)")
    done = dialog[:len(dialog) - 2] if continue_final else dialog
    ids = []
    for user, answer in zip(done[::2], done[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tok.encode(text, bos=True, eos=True)
    if continue_final:
        user, answer = dialog[-2:]
        return ids + tok.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()}",
                                bos=True)
    if len(dialog) % 2 == 1:
        ids += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids
