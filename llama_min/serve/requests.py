"""Checking an OpenAI request body, field by field, into a `Job` for the engine (no web framework here).

Every field this server reads is checked for type and range; a field it does not support is a 400 naming
it (unless it carries that field's neutral value, e.g. `n: 1`, `presence_penalty: 0`), never ignored in
silence. `null` means "not given", as in OpenAI's API. A prompt that leaves no room in the window for one
new token, or asks for more tokens than the window holds, is a 400 with code `context_length_exceeded`.
"""

from __future__ import annotations

import math
from typing import Optional

from jinja2 import TemplateError

from ..errors import LlamaMinError
from .engine import MAX_TOP_LOGPROBS as ENGINE_TOP_LOGPROBS, Request
from .shapes import ChatShape, CompletionShape

MAX_STOPS = 4  # as OpenAI's API
MAX_TOP_LOGPROBS = {"chat": ENGINE_TOP_LOGPROBS, "completion": 5}  # (the legacy completions API: 5)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user"}
FIELDS = {"chat": COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
          "completion": COMMON | {"prompt", "logprobs"}}
# fields read nowhere, accepted only with the value that changes nothing
NEUTRAL = {"n": [1], "best_of": [1], "echo": [False], "suffix": [""], "frequency_penalty": [0], "presence_penalty": [0],
           "logit_bias": [{}], "tools": [[]], "tool_choice": ["none"], "parallel_tool_calls": [False],
           "response_format": [{"type": "text"}], "store": [False], "metadata": [{}], "service_level": ["auto"]}


class ApiError(Exception):
    """A request the server does not take: HTTP status, OpenAI error type, the offending field (param)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code, self.headers = \
            message, param, status, kind, code, headers


class Job:
    """A checked request: the engine's Request plus what the HTTP side needs to answer it."""

    def __init__(self, kind: str, request: Request, stops: list, stream: bool, include_usage: bool,
                 logprobs: Optional[int]):
        self.kind, self.request, self.stops = kind, request, stops
        self.stream, self.include_usage = stream, include_usage
        self.logprobs = logprobs  # None: no logprobs; k: each token's logprob and its k most likely alternatives

    def shape(self, api):
        """The response builder for this kind of request."""
        cls = ChatShape if self.kind == "chat" else CompletionShape
        return cls(api.tok, api.model_id, self.logprobs)


def parse_chat(body: dict, tok, window: int) -> Job:
    """POST /v1/chat/completions: messages through the checkpoint's chat template (as `llama-min chat`)."""
    check_fields(body, "chat")
    dialog = messages(body.get("messages"))
    try:
        prompt = tok.encode_dialog(dialog)
    except (LlamaMinError, ValueError, TypeError, TemplateError) as e:  # e.g. "roles must alternate"
        raise ApiError(f"messages: the chat template refused them: {e}", "messages") from None
    logprobs = optional(body, "logprobs", bool)
    top = optional(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS["chat"])
    if top is not None and not logprobs:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = optional(body, "max_completion_tokens", int, 1)
    max_tokens = optional(body, "max_tokens", int, 1) if max_tokens is None else max_tokens
    return job("chat", body, prompt, max_tokens, window, (top or 0) if logprobs else None, "messages")


def parse_completion(body: dict, tok, window: int) -> Job:
    """POST /v1/completions: one prompt (text, or a list of token ids), encoded as `llama-min generate` does."""
    check_fields(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # ["text"] or [[ids]]: one prompt in a list
    if isinstance(prompt, str):
        ids = tok.encode(prompt, bos=tok.add_bos, eos=False)
    elif isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt):
        ids = prompt
        if not all(0 <= i < tok.n_words for i in ids):
            raise ApiError(f"prompt: token ids must be in [0, {tok.n_words})", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError("prompt: one prompt per request (this server takes no list of prompts)", "prompt")
    else:
        raise ApiError("prompt: expected a string or a list of token ids", "prompt")
    logprobs = optional(body, "logprobs", int, 0, MAX_TOP_LOGPROBS["completion"])
    return job("completion", body, ids, optional(body, "max_tokens", int, 1), window, logprobs, "prompt")


def job(kind: str, body: dict, prompt: list, max_tokens: Optional[int], window: int, logprobs: Optional[int],
        prompt_field: str) -> Job:
    """The fields both endpoints share, and the window check."""
    max_tokens = fit_window(len(prompt), max_tokens, window, prompt_field)
    temperature = optional(body, "temperature", (int, float), 0, 2)
    top_p = optional(body, "top_p", (int, float), 0, 1)
    temperature = 1.0 if temperature is None else float(temperature)
    top_p = 1.0 if top_p is None else float(top_p)
    if top_p == 0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    seed = optional(body, "seed", int, 0, 2**63 - 1)
    stream = bool(optional(body, "stream", bool))
    request = Request(prompt, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      top_logprobs=logprobs or 0)
    return Job(kind, request, stops(body.get("stop")), stream, include_usage(body, stream), logprobs)


def fit_window(n_prompt: int, max_tokens: Optional[int], window: int, field: str) -> int:
    """max_tokens (default: the rest of the window), or a 400 when prompt + completion cannot fit."""
    if n_prompt == 0:
        raise ApiError(f"{field}: the prompt is empty (0 tokens)", field)
    if n_prompt >= window:
        raise ApiError(f"{field}: the prompt is {n_prompt} tokens; this server's window is {window} tokens "
                       "(prompt + completion)", field, code="context_length_exceeded")
    if max_tokens is None:
        return window - n_prompt
    if n_prompt + max_tokens > window:
        raise ApiError(f"max_tokens: {n_prompt} prompt tokens + {max_tokens} new tokens do not fit this server's "
                       f"window of {window} tokens (ask for at most {window - n_prompt})", "max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def check_fields(body: dict, kind: str) -> None:
    """Every field is one this endpoint reads, or an unsupported one at its neutral value; else a 400."""
    for name, value in body.items():
        if name in FIELDS[kind] or value is None:
            continue
        if name in NEUTRAL and value in NEUTRAL[name]:
            continue
        if name in NEUTRAL:
            raise ApiError(f"{name}: not supported by this server (only {NEUTRAL[name][0]!r})", name)
        raise ApiError(f"{name}: unknown or unsupported field", name)
    if not isinstance(body.get("model", ""), str):
        raise ApiError("model: expected a string", "model")
    if not isinstance(body.get("user", ""), str):
        raise ApiError("user: expected a string", "user")


def messages(value) -> list:
    """`messages` as the dialog encode_dialog takes: [{"role", "content": str}]; text parts are joined."""
    if not isinstance(value, list) or not value:
        raise ApiError("messages: expected a non-empty list of {role, content} objects", "messages")
    dialog = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{where}: expected an object with role and content", where)
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ApiError(f"{where}.{extra[0]}: not supported by this server", f"{where}.{extra[0]}")
        if m.get("role") not in ROLES:
            raise ApiError(f"{where}.role: expected one of {', '.join(ROLES)}, got {m.get('role')!r}",
                           f"{where}.role")
        dialog.append({"role": ROLES[m["role"]], "content": content(m.get("content"), f"{where}.content")})
    return dialog


def content(value, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        for p in value:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(f"{where}: only text parts are supported, got type {p.get('type')!r}", where)
        return "".join(p["text"] for p in value)
    raise ApiError(f"{where}: expected a string or a list of text parts", where)


def stops(value) -> list:
    """`stop`: a string or a list of at most MAX_STOPS strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError("stop: expected a string or a list of strings", "stop")
    if len(value) > MAX_STOPS:
        raise ApiError(f"stop: at most {MAX_STOPS} strings, got {len(value)}", "stop")
    return [s for s in value if s]


def include_usage(body: dict, stream: bool) -> bool:
    """stream_options.include_usage (stream_options only with stream: true)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError("stream_options: only with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise ApiError("stream_options: expected an object", "stream_options")
    for name in options:
        if name != "include_usage":
            raise ApiError(f"stream_options.{name}: not supported by this server", f"stream_options.{name}")
    return bool(optional(options, "include_usage", bool, where="stream_options."))


def optional(body: dict, name: str, kind, low=None, high=None, where: str = ""):
    """body[name] checked: None when absent or null; else of `kind` (bool is not a number here) within
    [low, high]; a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return None
    field = where + name
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = {bool: "true or false", int: "an integer"}.get(kind, "a number")
        raise ApiError(f"{field}: expected {expected}, got {value!r}", field)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(f"{field}: expected a finite number, got {value!r}", field)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {'inf' if high is None else high}]"
        raise ApiError(f"{field}: {value} is out of range: expected a value in {bounds}", field)
    return value
