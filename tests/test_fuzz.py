"""Fuzzing the loaders with hypothesis: random configs, damaged weight and tokenizer files, random flags.

The property everywhere: a loader either succeeds or raises the project's error (LlamaMinError; the
tokenizer loaders: ValueError) as one line naming the file; never a KeyError, TypeError, struct.error,
a traceback from deep inside a library, or a hang. Examples are bounded (max_examples) so the file runs in
well under a minute on one thread; `deadline=None` because file writes vary in speed on a shared machine.
LLAMA_MIN_FUZZ_SCALE=N multiplies every example count for a deeper run.
"""

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_asset
from llama_min import load_checkpoint
from llama_min.errors import LlamaMinError
from llama_min.generation import Sampling, sample_next
from llama_min.decoding.sampling_checks import check_sampling
from llama_min.text.tokenizer import load_tokenizer
from test_errors import PARAMS, tiny_state_dict, write_gguf, write_own

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SCALE = int(os.environ.get("LLAMA_MIN_FUZZ_SCALE", "1"))  # e.g. 20 for a deeper local run
FUZZ = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = (st.none() | st.booleans() | st.integers(-3, 70) | st.integers(-2**63, 2**64)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def loads_or_refuses(load, named, errors=(LlamaMinError,)):
    """Run a loader: success, or one of `errors` as a single line naming `named`. Anything else fails."""
    try:
        return load()
    except errors as e:
        msg = str(e)
        assert "\n" not in msg, msg
        assert str(named) in msg, msg
        return None


def mutated(base: dict, keys):
    """A strategy of dicts: `base` with some keys replaced by random JSON values, some deleted."""
    return st.tuples(st.dictionaries(st.sampled_from(keys), JSON, max_size=4),
                     st.sets(st.sampled_from(sorted(base)), max_size=2)).map(
        lambda t: {k: v for k, v in {**base, **t[0]}.items() if k not in t[1]})


# --------------------------------------------------------------------------------- params.json, config.json

PARAMS_KEYS = sorted(PARAMS) + ["n_kv_heads", "multiple_of", "ffn_dim_multiplier", "head_dim", "use_scaled_rope",
                                "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                                "rope_freq_divisors", "tie_word_embeddings", "max_seq_len", "sliding_window",
                                "model", "unknown"]


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    return write_own(tmp_path_factory.mktemp("own") / "m")


@settings(max_examples=60 * SCALE, **FUZZ)
@given(params=mutated(PARAMS, PARAMS_KEYS))
def test_fuzz_params_json(own_dir, params):
    (own_dir / "params.json").write_text(json.dumps(params))
    loads_or_refuses(lambda: load_checkpoint(own_dir), own_dir)


@settings(max_examples=25 * SCALE, **FUZZ)
@given(raw=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_params_json_bytes(own_dir, raw):
    (own_dir / "params.json").write_bytes(raw)
    loads_or_refuses(lambda: load_checkpoint(own_dir), own_dir / "params.json")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Hugging Face folder with llama3 RoPE scaling (written by save_hf: no transformers import here)."""
    from llama_min import ModelArgs
    from llama_min.checkpoint import save_hf

    path = tmp_path_factory.mktemp("hf") / "m"
    args = ModelArgs(**PARAMS, use_scaled_rope=True, rope_scaling_factor=8.0, max_seq_len=64)
    save_hf(path, args, tiny_state_dict())
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = dict(cfg.pop("rope_scaling"), rope_theta=cfg.pop("rope_theta"))  # transformers 5
    return path, cfg


HF_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
           "intermediate_size", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
           "tie_word_embeddings", "max_position_embeddings", "model_type", "architectures", "hidden_act",
           "attention_bias", "mlp_bias", "sliding_window", "bos_token_id", "eos_token_id"]


@settings(max_examples=60 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_config_json(hf_dir, data):
    path, base = hf_dir
    cfg = data.draw(mutated(base, HF_KEYS))
    if data.draw(st.booleans()):  # also reach inside the nested rope settings
        cfg["rope_parameters"] = data.draw(mutated(base["rope_parameters"], sorted(base["rope_parameters"])
                                                   + ["type", "rope_type"]))
    (path / "config.json").write_text(json.dumps(cfg))
    loads_or_refuses(lambda: load_checkpoint(path), path)


# ---------------------------------------------------------------------------------- damaged weight files

def _damage(data: bytes, draw, header_bytes: int):
    """Truncate, or flip a few bytes (mostly in the first `header_bytes`), or append junk."""
    how = draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, min(header_bytes, len(out)) - 1))
        out[i] = draw(st.integers(0, 255))
    return bytes(out)


@pytest.fixture(scope="module")
def safetensors_bytes(own_dir):
    return (own_dir / "model.safetensors").read_bytes()


@settings(max_examples=40 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_safetensors(tmp_path, safetensors_bytes, data):
    path = write_own(tmp_path / "m", sd={})
    header = 8 + int.from_bytes(safetensors_bytes[:8], "little")
    (path / "model.safetensors").write_bytes(_damage(safetensors_bytes, data.draw, header))
    loads_or_refuses(lambda: load_checkpoint(path), path)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "t.gguf", sd=tiny_state_dict())
    return path.read_bytes()


@settings(max_examples=60 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_tiny_gguf(tmp_path, gguf_bytes, data):
    path = tmp_path / "t.gguf"
    path.write_bytes(_damage(gguf_bytes, data.draw, header_bytes=1200))
    loads_or_refuses(lambda: load_checkpoint(path), path)


@settings(max_examples=15 * SCALE, **FUZZ)
@given(raw=st.binary(max_size=48))
def test_fuzz_gguf_magic_then_junk(tmp_path, raw):
    path = tmp_path / "j.gguf"
    path.write_bytes(b"GGUF" + raw)
    loads_or_refuses(lambda: load_checkpoint(path), path)
    loads_or_refuses(lambda: load_tokenizer(path), path, errors=(ValueError,))


@pytest.fixture(scope="module")
def smollm2_header():
    """The metadata + tensor directory of the cached SmolLM2 GGUF (everything before its tensor data)."""
    from llama_min.files.gguf import read_gguf_tensor_infos

    path = require_asset("smollm2")
    _, infos = read_gguf_tensor_infos(path)
    with open(path, "rb") as f:
        return f.read(min(offset for *_, offset in infos))


@settings(max_examples=12 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_truncated_smollm2_header(tmp_path, smollm2_header, data):
    """SmolLM2's header cut anywhere: the checkpoint and tokenizer loaders both refuse cleanly."""
    path = tmp_path / "s.gguf"
    path.write_bytes(smollm2_header[:data.draw(st.integers(0, len(smollm2_header) - 1))])
    loads_or_refuses(lambda: load_checkpoint(path), path)
    loads_or_refuses(lambda: load_tokenizer(path), path, errors=(ValueError,))


# ------------------------------------------------------------------------------------------ tokenizers

@pytest.fixture(scope="module")
def spm_bytes():
    return require_asset("llama2-tokenizer").read_bytes()


@settings(max_examples=12 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_sentencepiece_model(tmp_path, spm_bytes, data):
    _damaged_tokenizer_loads_or_refuses(tmp_path, spm_bytes, data)


def _damaged_tokenizer_loads_or_refuses(tmp_path, raw: bytes, data):
    """A damaged copy of a tokenizer.model file loads (and then encodes and decodes) or is refused in one line."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_damage(raw, data.draw, header_bytes=len(raw)))
    tok = loads_or_refuses(lambda: load_tokenizer(path), path, errors=(ValueError,))
    if tok is not None:
        tok.decode(tok.encode("Hello world"))


@pytest.fixture(scope="module")
def tiktoken_bytes():
    """The first 3000 ranks of Meta's Llama 3 tiktoken file (small enough to load many times)."""
    return b"".join(require_asset("llama3-tokenizer").read_bytes().splitlines(keepends=True)[:3000])


@settings(max_examples=20 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_tiktoken_model(tmp_path, tiktoken_bytes, data):
    _damaged_tokenizer_loads_or_refuses(tmp_path, tiktoken_bytes, data)


@settings(max_examples=25 * SCALE, **FUZZ)
@given(data=st.data())
def test_fuzz_tokenizer_json(tmp_path, data):
    """A small byte-level BPE tokenizer.json (written by the tokenizers library), mutated as JSON and bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.BPEDecoder()
    base = json.loads(tk.to_str())
    cfg = data.draw(mutated(base, sorted(base)))
    path = tmp_path / "tokenizer.json"
    raw = json.dumps(cfg).encode()
    path.write_bytes(_damage(raw, data.draw, len(raw)) if data.draw(st.booleans()) else raw)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(data.draw(
        st.fixed_dictionaries({}, optional={"bos_token": JSON, "eos_token": JSON, "add_bos_token": JSON}))))
    tok = loads_or_refuses(lambda: load_tokenizer(path), tmp_path, errors=(ValueError,))
    if tok is not None:
        tok.decode(tok.encode("hello"))


# ------------------------------------------------------------------------------------------- sampling

NUMBERS = st.none() | st.booleans() | st.integers(-3, 100) | st.floats(allow_nan=True, allow_infinity=True) \
    | st.floats(0, 1) | st.text(max_size=3)


@settings(max_examples=150 * SCALE, **FUZZ)
@given(t=NUMBERS, p=NUMBERS, k=NUMBERS, m=NUMBERS, r=NUMBERS)
def test_fuzz_sampling_checks(t, p, k, m, r):
    """Accepted settings really sample (valid ids, no NaN trouble); refused ones name the flag in one line."""
    try:
        check_sampling(t, p, k, m, r)
    except LlamaMinError as e:
        assert "\n" not in str(e) and "--" in str(e)
        return
    logits = torch.randn(2, 11, generator=torch.Generator().manual_seed(0)) * 5
    history = torch.tensor([[1, 2, -1], [3, 3, 4]])
    ids = sample_next(logits, Sampling(t, p, k, m, r), history, torch.Generator().manual_seed(1))
    assert ids.shape == (2,) and 0 <= int(ids.min()) and int(ids.max()) < 11


BAD_SAMPLING = [dict(temperature=math.nan), dict(min_p=2), dict(min_p=-0.5), dict(top_p=math.nan), dict(top_p=-0.1),
                dict(top_k=0), dict(top_k=2.5), dict(temperature=math.inf), dict(repetition_penalty=0),
                dict(repetition_penalty=math.nan), dict(temperature=True), dict(temperature=2e-43),
                dict(repetition_penalty=1e300)]
FLAGS = ["--temperature", "--min-p", "--min-p", "--top-p", "--top-p", "--top-k", "--top-k", "--temperature",
         "--repetition-penalty", "--repetition-penalty", "--temperature", "--temperature", "--repetition-penalty"]


@pytest.mark.parametrize("kw", BAD_SAMPLING)
def test_sampling_refuses_what_check_sampling_refuses(kw):
    with pytest.raises(ValueError):
        Sampling(**{"temperature": 0.6, "top_p": 0.9, **kw})


def test_sampling_checks_examples():
    """Hand-picked cases the issue names, so the rules above are pinned, not only fuzzed."""
    check_sampling(0, 1.0)
    check_sampling(0.7, 0.0)  # top_p 0: only the most likely token survives Meta's nucleus rule
    check_sampling(0.6, 0.9, top_k=40, min_p=0.0, repetition_penalty=1.1)
    for kw, flag in zip(BAD_SAMPLING, FLAGS):
        with pytest.raises(LlamaMinError, match=flag):
            check_sampling(**{"temperature": 0.6, "top_p": 0.9, **kw})
