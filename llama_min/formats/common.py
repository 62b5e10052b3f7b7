"""What every format reader shares: checked reads of config values, tensor access (safetensors,
weights-only torch files) with dtype checks, the shapes a model needs, and the q/k row permutation between
Hugging Face's and Meta's RoPE layouts.

Validation happens here, at the edge: a config value of the wrong type or range, a tensor of the wrong dtype
or shape, a pickle that is not plain tensors, each ends in one `LlamaMinError` line that names the file and
the key, never in a traceback from deep inside a forward pass.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ..errors import LlamaMinError
from ..model import ROPE_SCALINGS, ModelArgs

REQUIRED = object()  # a ConfigReader default meaning "the key must be present"


def show(value) -> str:
    """A config value as a short one-line JSON-like text for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(err) -> str:
    """The first non-empty line of an exception's message (library errors can span many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class ConfigReader:
    """Typed reads from one config mapping; every refusal is one LlamaMinError naming the file and the key.

    A key holding null counts as absent: it takes its default, or is an error when required.
    `prefix` is put before every key looked up (GGUF's flat "llama.*" keys); `within` names a nested
    object in messages ("rope_scaling." for the keys of config.json's rope_scaling).
    """

    def __init__(self, data, source, prefix: str = "", within: str = ""):
        if not isinstance(data, dict):
            if within:
                raise LlamaMinError(f"{source}: \"{within.rstrip('.')}\": {show(data)}; expected an object")
            raise LlamaMinError(f"{source}: expected a JSON object of settings, found {type(data).__name__}")
        self.data, self.source, self.prefix, self.within = data, str(source), prefix, within

    def error(self, key: str, value, expected: str) -> LlamaMinError:
        return LlamaMinError(f"{self.source}: \"{self.within}{self.prefix}{key}\": {show(value)}; expected {expected}")

    def raw(self, key: str, default):
        value = self.data.get(self.prefix + key)
        if value is None and default is REQUIRED:
            raise LlamaMinError(f"{self.source}: missing key \"{self.within}{self.prefix}{key}\"")
        return value

    def checked(self, key: str, default, ok, expected: str, convert=None):
        """The value at `key` if `ok(value)` (then `convert(value)` when given), else an error saying it
        expected `expected`; `default` when absent. Every typed read below is one of these."""
        value = self.raw(key, default)
        if value is None:
            return default
        if not ok(value):
            raise self.error(key, value, expected)
        return convert(value) if convert else value

    def int(self, key: str, default=REQUIRED, minimum: int = 1):
        """An integer >= minimum (a float with an integer value counts); `default` when absent."""
        return self.checked(key, default, lambda v: is_integral(v) and v >= minimum, f"an integer >= {minimum}", int)

    def number(self, key: str, default=REQUIRED) -> float:
        """A finite positive number; `default` when absent."""
        return self.checked(key, default, is_positive_number, "a positive finite number", float)

    def flag(self, key: str, default: bool = False) -> bool:
        return self.checked(key, default, lambda v: isinstance(v, bool), "true or false")

    def text(self, key: str, default=None):
        return self.checked(key, default, lambda v: isinstance(v, str), "a string")

    def numbers(self, key: str, default=None):
        """A non-empty list of positive finite numbers; `default` when absent."""
        return self.checked(key, default, lambda v: isinstance(v, list) and v and all(map(is_positive_number, v)),
                            "a list of positive numbers", lambda v: [float(x) for x in v])


def is_integral(value) -> bool:
    """An int, or a float with an integer value (JSON writers differ); never a bool."""
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer())


def is_positive_number(value) -> bool:
    """An int or float in (0, inf); never a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def build_args(source, renames: Optional[dict] = None, **values) -> ModelArgs:
    """ModelArgs(**values), its own checks (sizes, divisibility) re-raised as one line naming `source`.

    `renames` maps ModelArgs field names to the file's own key names, so the message speaks the file's words.
    """
    try:
        args = ModelArgs(**values)
    except (ValueError, TypeError) as e:
        msg = one_line(e)
        for field, key in (renames or {}).items():
            msg = re.sub(rf"(?<!head )\b{field}\b", key, msg)  # "head dim" is not the model dim
        raise LlamaMinError(f"{source}: {msg}") from None
    check_llama3_rope(args, source)
    return args


def check_llama3_rope(args: ModelArgs, source) -> None:
    """Llama 3.1 scaling divides by (high - low) and by the wavelength band: refuse settings it cannot use."""
    if args.use_scaled_rope and not args.rope_high_freq_factor > args.rope_low_freq_factor:
        raise LlamaMinError(f"{source}: llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                            f"{args.rope_high_freq_factor} and {args.rope_low_freq_factor}")


# ------------------------------------------------------------------------------------------------
# RoPE scalings: the one mapping "a scaling description -> ModelArgs fields"
#
# A description is transformers' dict (config.json's rope_scaling / rope_parameters): rope_type (or type),
# factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim,
# truncate, low_freq_factor, high_freq_factor. The HF reader passes the file's dict, the GGUF reader its
# llama.rope.scaling.* keys in these words, and Llama.build's override (--rope-scaling TYPE:FACTOR,...) the
# user's. Defaults are transformers' (modeling_rope_utils): yarn's L0 = the model's max_position_embeddings
# and, without a factor, factor = max_position_embeddings / L0; null or 0 betas mean 32 and 1; truncate true;
# dynamic's M = max_position_embeddings; llama3's low/high_freq_factor 1 and 4.
# ------------------------------------------------------------------------------------------------

ROPE_TYPES = ROPE_SCALINGS  # linear, dynamic, yarn, llama3
ROPE_SPEC_KEYS = {  # the keys a description may hold -> their kind ("orig" is the flag's short name)
    "factor": "number", "original_max_position_embeddings": "int", "beta_fast": "number-or-0",
    "beta_slow": "number-or-0", "attention_factor": "number", "mscale": "number-or-0",
    "mscale_all_dim": "number-or-0", "truncate": "flag", "low_freq_factor": "number", "high_freq_factor": "number",
}
ROPE_KEY_ALIASES = {"orig": "original_max_position_embeddings"}
# Every ModelArgs field a scaling sets; an override resets them all first (the file's scaling is replaced).
ROPE_SCALING_FIELDS = ("use_scaled_rope", "rope_scaling_type", "rope_scaling_factor", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_original_max_pos", "rope_beta_fast", "rope_beta_slow",
                       "rope_truncate", "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim",
                       "rope_freq_divisors")
ROPE_SPEC_FORM = "TYPE:FACTOR[,key=value...]"


def rope_scaling_fields(desc, source, window: Optional[int] = None, within: str = "rope_scaling.") -> dict:
    """ModelArgs fields for one scaling description (transformers' words); {} for "default" / "none".

    window: the model's max_position_embeddings (HF), context length (GGUF) or trained window (an override),
    the default of yarn's L0 and dynamic's M. An unsupported type (longrope, ...) is one LlamaMinError line
    naming the supported ones; so is a value of the wrong kind, or a yarn / dynamic with no window to default to.
    """
    r = ConfigReader(desc, source, within=within)
    type_key = "rope_type" if r.raw("rope_type", None) is not None else "type"
    kind = r.text(type_key, "default")
    if kind in ("default", "none"):
        return {}
    if kind not in ROPE_TYPES:
        raise r.error(type_key, kind, f"one of {', '.join(ROPE_TYPES)} (or default); other RoPE scalings are "
                                      "not supported")
    factor, orig = r.number("factor", None), r.int("original_max_position_embeddings", None)
    out = {"rope_scaling_type": kind}
    if kind in ("linear", "dynamic", "llama3"):
        out["rope_scaling_factor"] = r.number("factor")  # transformers requires it for these
    if kind == "dynamic":
        out["rope_original_max_pos"] = _rope_window(r, orig or window, "M")
    elif kind == "llama3":
        out.update(rope_low_freq_factor=r.number("low_freq_factor", 1.0),
                   rope_high_freq_factor=r.number("high_freq_factor", 4.0),
                   rope_original_max_pos=orig or window or 8192)
    elif kind == "yarn":
        out.update(_yarn_fields(r, factor, _rope_window(r, orig or window, "L0"), window))
    return out


def _rope_window(r: ConfigReader, value: Optional[int], what: str) -> int:
    if value is None:
        raise LlamaMinError(f"{r.source}: \"{r.within}original_max_position_embeddings\" is missing and the "
                            f"model's file does not say its trained window ({what}); give it")
    return value


def _yarn_fields(r: ConfigReader, factor: Optional[float], original: int, window: Optional[int]) -> dict:
    """yarn's fields: without a factor, transformers' max_position_embeddings / L0; 0 or null betas: 32 and 1."""
    if factor is None:
        factor = window / original if window else r.number("factor")
    return dict(
        rope_scaling_factor=float(factor), rope_original_max_pos=original,
        rope_beta_fast=zero_is_none(r, "beta_fast") or 32.0, rope_beta_slow=zero_is_none(r, "beta_slow") or 1.0,
        rope_truncate=r.flag("truncate", True), rope_attention_factor=r.number("attention_factor", None),
        rope_mscale=zero_is_none(r, "mscale"), rope_mscale_all_dim=zero_is_none(r, "mscale_all_dim"),
    )


def zero_is_none(r: ConfigReader, key: str) -> Optional[float]:
    """A number >= 0 where 0 means unset (transformers tests these keys for truth); None when absent or 0."""
    return r.checked(key, None, lambda v: is_positive_number(v) or v == 0, "a number >= 0", float) or None


def parse_rope_scaling(text: str, flag: str = "--rope-scaling") -> dict:
    """`TYPE:FACTOR[,key=value...]` -> a description dict ({"rope_type": TYPE, "factor": FACTOR, key: value}).

    Keys: original_max_position_embeddings (alias orig), beta_fast, beta_slow, attention_factor, mscale,
    mscale_all_dim, truncate (true/false), low_freq_factor, high_freq_factor. A bad spec is one LlamaMinError
    naming the flag, the form and the supported types.
    """
    def bad(why: str) -> LlamaMinError:
        return LlamaMinError(f"{flag} {text!r}: {why}; expected {ROPE_SPEC_FORM} with TYPE one of "
                             f"{', '.join(ROPE_TYPES)} (e.g. linear:4 or yarn:4,orig=4096)")

    head, _, rest = str(text).strip().partition(",")
    kind, colon, factor = head.partition(":")
    kind = kind.strip()
    if kind not in ROPE_TYPES:
        raise bad(f"unsupported scaling type {kind!r}" if kind else "no scaling type")
    if not colon or not factor.strip():
        raise bad("no factor")
    desc = {"rope_type": kind, "factor": _spec_value(factor, "factor", bad)}
    for item in filter(str.strip, rest.split(",")) if rest else ():
        key, eq, value = item.partition("=")
        key = ROPE_KEY_ALIASES.get(key.strip(), key.strip())
        if not eq or key not in ROPE_SPEC_KEYS or key == "factor":
            raise bad(f"unknown setting {item.strip()!r} (keys: orig, {', '.join(k for k in ROPE_SPEC_KEYS if k != 'factor')})")
        desc[key] = _spec_value(value, key, bad)
    return desc


def _spec_value(text: str, key: str, bad):
    """One value of a --rope-scaling spec in the kind its key holds (checked again by rope_scaling_fields)."""
    text, kind = text.strip(), ROPE_SPEC_KEYS[key]
    if kind == "flag":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise bad(f"{key}={text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        value = float(text)
    except ValueError:
        raise bad(f"{key}={text!r} is not a number") from None
    if kind == "int":
        if not value.is_integer() or value < 1:
            raise bad(f"{key}={text!r} is not a positive integer")
        return int(value)
    if not (is_positive_number(value) or kind == "number-or-0" and value == 0):
        raise bad(f"{key}={text!r} is not a positive number")
    return value


def rope_override(args: ModelArgs, scaling, source: str = "rope_scaling") -> ModelArgs:
    """Apply a scaling chosen at load time to `args`, in place (and return it): the file's scaling is replaced.

    scaling: None (nothing changes), a `TYPE:FACTOR[,key=value...]` text, or a description dict
    ({"type" or "rope_type": ..., "factor": ..., ...}, keys as parse_rope_scaling's). dynamic's M and yarn's
    L0 default to the model's trained window (its file's; else the max_seq_len the file said). One
    LlamaMinError line naming `source` for a bad scaling.
    """
    if scaling is None:
        return args
    desc = parse_rope_scaling(scaling, source) if isinstance(scaling, str) else _checked_desc(scaling, source)
    fields_ = rope_scaling_fields(desc, source, window=args.trained_window or args.max_seq_len, within="")
    defaults = ModelArgs()
    values = {name: getattr(defaults, name) for name in ROPE_SCALING_FIELDS}
    values.update(fields_, use_scaled_rope=fields_.get("rope_scaling_type") == "llama3")
    try:
        checked = replace(args, **values)
    except (ValueError, TypeError) as e:
        raise LlamaMinError(f"{source}: {one_line(e)}") from None
    check_llama3_rope(checked, source)
    for name in ROPE_SCALING_FIELDS:
        setattr(args, name, getattr(checked, name))
    return args


def _checked_desc(desc, source) -> dict:
    """A description dict given to Llama.build: only known keys ("type"/"rope_type" + ROPE_SPEC_KEYS, "orig")."""
    if not isinstance(desc, dict):
        raise LlamaMinError(f"{source}: {show(desc)}; expected {ROPE_SPEC_FORM} or a dict like "
                            "{\"type\": \"linear\", \"factor\": 4.0}")
    out = {ROPE_KEY_ALIASES.get(k, k): v for k, v in desc.items()}
    unknown = sorted(set(out) - set(ROPE_SPEC_KEYS) - {"type", "rope_type"})
    if unknown:
        raise LlamaMinError(f"{source}: unknown setting {unknown[0]!r}; expected type, factor, "
                            f"{', '.join(k for k in ROPE_SPEC_KEYS if k != 'factor')}")
    return out


def rope_scaling_desc(args: ModelArgs) -> Optional[dict]:
    """The description (transformers' words) of args' scaling, None without one: what writers write."""
    kind = args.rope_scaling_type
    if kind is None:
        return None
    desc = {"rope_type": kind, "factor": args.rope_scaling_factor}
    if kind in ("yarn", "llama3"):
        desc["original_max_position_embeddings"] = args.rope_original_max_pos
    if kind == "llama3":
        desc.update(low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor)
    if kind == "yarn":
        desc.update(beta_fast=args.rope_beta_fast, beta_slow=args.rope_beta_slow, truncate=args.rope_truncate)
        optional = {"attention_factor": args.rope_attention_factor, "mscale": args.rope_mscale,
                    "mscale_all_dim": args.rope_mscale_all_dim}
        desc.update({k: v for k, v in optional.items() if v is not None})
    return desc


# ModelArgs fields as params.json spells them, with the kind of value each must hold.
PARAMS_KINDS = {
    "dim": "int", "n_layers": "int", "n_heads": "int", "n_kv_heads": "int", "vocab_size": "int-or--1",
    "multiple_of": "int", "ffn_dim_multiplier": "number", "hidden_dim": "int", "head_dim": "int",
    "norm_eps": "number", "rope_theta": "number", "use_scaled_rope": "flag", "rope_scaling_factor": "number",
    "rope_low_freq_factor": "number", "rope_high_freq_factor": "number", "rope_original_max_pos": "int",
    "rope_freq_divisors": "numbers", "tie_word_embeddings": "flag", "max_seq_len": "int",
    "rope_scaling_type": "text", "rope_beta_fast": "number", "rope_beta_slow": "number", "rope_truncate": "flag",
    "rope_attention_factor": "number", "rope_mscale": "number", "rope_mscale_all_dim": "number",
    "sliding_window": "int", "trained_window": "int",
}
PARAMS_REQUIRED = ("dim", "n_layers", "n_heads")


def args_from_params(params, source) -> ModelArgs:
    """ModelArgs from a params.json dict (Meta's, or ours), every value type-checked.

    dim, n_layers and n_heads are required (a missing one must not silently become 7B's default); keys
    holding null take ModelArgs' defaults; a nested {"model": {...}} is accepted; unknown keys are ignored.
    trained_window: the file's own, else its max_seq_len (own files written before the field); Meta's files
    have neither (None: unknown).
    """
    if isinstance(params, dict) and isinstance(params.get("model"), dict):
        params = params["model"]
    r = ConfigReader(params, source)
    values = {}
    for key, kind in PARAMS_KINDS.items():
        default = REQUIRED if key in PARAMS_REQUIRED else None
        if kind == "int-or--1":
            value = r.int(key, default, minimum=-1)
        else:
            value = getattr(r, kind)(key, default)
        if value is not None:
            values[key] = value
    if "trained_window" not in params and "max_seq_len" in values:  # own files before the field: their window
        values["trained_window"] = values["max_seq_len"]
    return build_args(source, **values)


def expected_shapes(args: ModelArgs) -> dict:
    """Every tensor a model with these args needs, Meta names -> shape."""
    d, hd, F = args.dim, args.hd, args.ffn_hidden
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d), p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d), p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (F, d), p + "feed_forward.w3.weight": (F, d),
            p + "feed_forward.w2.weight": (d, F),
        })
    return shapes


def check_state_dict(args: ModelArgs, sd: dict, source) -> None:
    """Raise one LlamaMinError naming the file and key for a missing, unexpected, misshapen or non-float tensor."""
    want = expected_shapes(args)
    for key, shape in want.items():
        if key not in sd:
            raise LlamaMinError(f"{source}: missing tensor '{key}' (expected shape {list(shape)})")
        check_float(sd[key], key, source)
        if tuple(sd[key].shape) != shape:
            raise LlamaMinError(f"{source}: tensor '{key}' has shape {list(sd[key].shape)}, expected {list(shape)}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise LlamaMinError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unknown keys)")


def check_float(t, key: str, source) -> None:
    """Weights must be floating point: integer or bool tensors are not weights (and casting would hide it)."""
    if not isinstance(t, torch.Tensor):
        raise LlamaMinError(f"{source}: '{key}' is a {type(t).__name__}, expected a tensor")
    if not t.dtype.is_floating_point:
        raise LlamaMinError(f"{source}: tensor '{key}' has dtype {str(t.dtype).replace('torch.', '')}, "
                            "expected floating point (float32, float16, bfloat16)")


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: per head, HF row j*hd/2 + i holds Meta row 2i + j.

    HF implements RoPE as "rotate half" (feature i pairs with i + hd/2), Meta pairs 2i with 2i+1.
    View the rows as (heads, 2, hd/2), swap the last two axes, flatten. Use K heads for wk.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_meta_qk`: per head, view rows as (hd/2, 2), swap, flatten."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_inplace(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """hf_to_meta_qk written back into w's own memory (a memory-mapped private page becomes owned)."""
    try:
        return w.copy_(hf_to_meta_qk(w, n_heads))
    except RuntimeError:  # read-only storage
        return hf_to_meta_qk(w, n_heads).clone()


def cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def safetensors_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LlamaMinError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def torch_load(path: Path):
    """A .pth/.bin file's content, memory-mapped, weights-only (never unpickles code).

    A pickle naming anything but tensors and plain containers is refused in one line (torch's own
    message spans several).
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Weights only load failed" in text:
            what = f" ({found.group(1)})" if found else ""
            raise LlamaMinError(f"{path}: refused: the pickle holds objects other than tensors{what}; "
                                "llama_min reads weights-only files") from None
        raise LlamaMinError(f"{path}: cannot load as a PyTorch weights file ({one_line(e)})") from None
    return sd


def torch_weights(path: Path) -> dict:
    """A .pth/.bin state dict: `torch_load`, then checked to be {name: floating-point tensor}."""
    sd = torch_load(path)
    if not isinstance(sd, dict):
        raise LlamaMinError(f"{path}: holds a {type(sd).__name__}, expected a dict of tensors")
    for key, t in sd.items():
        check_float(t, str(key), path)
    return sd


def load_safetensors(path: Path, dtype) -> dict:
    """Tensors of one safetensors file, memory-mapped (copy-on-write), dtype-checked before any cast."""
    f = safetensors_open(path)
    out = {}
    try:
        for k in f.keys():
            t = f.get_tensor(k)
            check_float(t, k, path)
            out[k] = cast(t, dtype)
    except LlamaMinError:
        raise
    except Exception as e:  # a truncated file fails here
        raise LlamaMinError(f"{path}: cannot read tensors ({one_line(e)})") from None
    return out
