"""RoPE past the trained window: linear, dynamic (NTK) and YaRN scalings in model.py, logits against transformers'
LlamaForCausalLM (the independent oracle) at positions up to 4x the original window; the unscaled table
bit-identical to Meta's formula; unsupported scalings refused in one line."""

import math

import pytest
import torch

from _tiny import rand_tokens

# Tiny shape: head dim 32 (16 RoPE pairs) so YaRN's ramp spans several pairs; a small window (64) so 4x fits.
WINDOW = 64
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=128, hidden_dim=160)


def hf_model(rope: dict, max_pos: int, seed: int = 0):
    """A random float32 LlamaForCausalLM with these rope_parameters (norm weights around 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=128, rms_norm_eps=1e-5,
                      max_position_embeddings=max_pos, tie_word_embeddings=False, rope_parameters=dict(rope))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 0.1)
    return model


def ours_from(hf, **rope_args):
    """llama_min's Transformer holding the HF model's weights (Meta names, q/k rows un-permuted)."""
    from llama_min import ModelArgs, Transformer
    from llama_min.formats.common import hf_to_meta_qk
    from llama_min.formats.hf import hf_to_meta_name

    args = ModelArgs(**SHAPE, max_seq_len=4 * WINDOW, **rope_args)
    sd = {}
    for key, t in hf.state_dict().items():
        name = hf_to_meta_name(key)
        if name is None:
            continue
        if name.endswith("attention.wq.weight"):
            t = hf_to_meta_qk(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = hf_to_meta_qk(t, args.kv_heads)
        sd[name] = t
    model = Transformer(args).eval()
    model.load_state_dict(sd)
    return model


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# (transformers' rope_parameters, max_position_embeddings, the same in ModelArgs fields)
CASES = {
    "linear-x4": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, WINDOW,
                  dict(rope_scaling_type="linear", rope_scaling_factor=4.0)),
    "yarn-defaults": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": WINDOW}, 4 * WINDOW,
                      dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_original_max_pos=WINDOW)),
    # base 100: the ramp runs over pairs 0..9 of 16 (with base 1e4 it ends at pair 3)
    "yarn-betas-attention": ({"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                              "original_max_position_embeddings": WINDOW, "beta_fast": 16.0, "beta_slow": 2.0,
                              "attention_factor": 1.3}, 4 * WINDOW,
                             dict(rope_theta=100.0, rope_scaling_type="yarn", rope_scaling_factor=4.0,
                                  rope_original_max_pos=WINDOW, rope_beta_fast=16.0, rope_beta_slow=2.0,
                                  rope_attention_factor=1.3)),
    "yarn-mscale": ({"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                     "original_max_position_embeddings": WINDOW, "mscale": 1.0, "mscale_all_dim": 0.7}, 4 * WINDOW,
                    dict(rope_theta=100.0, rope_scaling_type="yarn", rope_scaling_factor=4.0,
                         rope_original_max_pos=WINDOW, rope_mscale=1.0, rope_mscale_all_dim=0.7)),
    "yarn-no-truncate": ({"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                          "original_max_position_embeddings": WINDOW, "truncate": False}, 4 * WINDOW,
                         dict(rope_theta=100.0, rope_scaling_type="yarn", rope_scaling_factor=4.0,
                              rope_original_max_pos=WINDOW, rope_truncate=False)),
    "dynamic-x4": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, WINDOW,
                   dict(rope_scaling_type="dynamic", rope_scaling_factor=4.0, rope_original_max_pos=WINDOW)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_up_to_4x_the_window(name):
    """One forward over 4 x 64 positions (dynamic: its table for s = 256, as transformers recomputes it)."""
    rope, max_pos, fields = CASES[name]
    hf = hf_model(rope, max_pos)
    ours = ours_from(hf, **fields)
    tokens = rand_tokens(2, 4 * WINDOW, seed=5)
    with torch.no_grad():
        expected, got = hf(tokens).logits.float(), ours(tokens)
    diff = max_diff(got, expected)
    print(f"[rope scaling] {name}: max|dlogits| = {diff:.2e} (logit scale {expected.abs().max():.1f})")
    assert diff <= 1e-4


def test_scalings_change_the_logits_past_the_window():
    """Negative control: each scaled model differs from the unscaled one there (the tests above can fail)."""
    tokens = rand_tokens(1, 4 * WINDOW, seed=5)
    hf = hf_model({"rope_type": "default", "rope_theta": 10000.0}, WINDOW)
    with torch.no_grad():
        plain = ours_from(hf)(tokens)
        for name, (_, _, fields) in CASES.items():
            assert max_diff(ours_from(hf, **fields)(tokens), plain) > 1e-2, name


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.x renames past_key_values to cache
def test_dynamic_with_the_kv_cache_matches_transformers_chunk_by_chunk():
    """transformers recomputes dynamic's table per forward from the positions it covers; keys already in the
    cache keep the rotation they were stored with. Fed the same chunks (a prompt inside the window, a chunk
    crossing it, single tokens, a long chunk to 4x), both give the same logits for every chunk, and those
    differ from one forward over the whole sequence (whose table is the one for 256, at every position)."""
    rope, max_pos, fields = CASES["dynamic-x4"]
    hf = hf_model(rope, max_pos)
    ours = ours_from(hf, **fields)
    tokens = rand_tokens(1, 4 * WINDOW, seed=6)
    bounds = [0, 48, 100, 101, 102, 103, 4 * WINDOW]
    ours.setup_cache(1, 4 * WINDOW)
    cache, got, expected = None, [], []
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            got.append(ours(tokens[:, a:b], a))
            out = hf(tokens[:, a:b], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            expected.append(out.logits.float())
        ours.clear_cache()
        whole, prompt = ours(tokens), ours(tokens[:, :48])
    for (a, b), g, e in zip(zip(bounds, bounds[1:]), got, expected):
        diff = max_diff(g, e)
        print(f"[rope scaling] dynamic, cached chunk [{a}, {b}): max|dlogits| = {diff:.2e}")
        assert diff <= 1e-4
    assert torch.equal(got[0], prompt)  # inside the window: the plain table
    # One forward over all 256 rotates every position, those inside the window too, by the table for 256;
    # the chunks rotated their first 48 positions by the plain table, the next 52 by the table for 100, ...
    assert max_diff(torch.cat(got, dim=1), whole) > 1e-2


def test_dynamic_tables_follow_the_length():
    """rope_rows: the precomputed rows up to the window, past it the rows of the table for s = start + T."""
    from llama_min import ModelArgs, Transformer
    from llama_min.model import dynamic_ntk_base, rope_frequencies

    args = ModelArgs(**SHAPE, max_seq_len=4 * WINDOW, rope_scaling_type="dynamic", rope_scaling_factor=4.0,
                     rope_original_max_pos=WINDOW)
    model = Transformer(args)
    plain = Transformer(ModelArgs(**SHAPE, max_seq_len=4 * WINDOW))
    assert torch.equal(model.freqs_cis, plain.freqs_cis)
    assert torch.equal(model.rope_rows(10, 54), plain.freqs_cis[10:64])  # s = 64 = M: unscaled
    assert torch.equal(rope_frequencies(args, WINDOW), rope_frequencies(args))
    rows = model.rope_rows(120, 8)  # s = 128 = 2M: base' = base * (4 * 2 - 3) ^ (32 / 30)
    base = dynamic_ntk_base(10000.0, 4.0, 128, WINDOW, 32)
    assert base == pytest.approx(10000.0 * 5 ** (32 / 30))
    angles = torch.outer(torch.arange(120, 128).double(), base ** (-torch.arange(0, 32, 2).double() / 32))
    torch.testing.assert_close(rows, torch.polar(torch.ones_like(angles), angles).to(torch.complex64),
                               atol=2e-5, rtol=0)


def test_yarn_table_is_the_attention_factor_times_unit_rotations():
    """freqs_cis magnitude = a: 0.1 ln(factor) + 1 by default, attention_factor when given, the mscale ratio."""
    from llama_min import ModelArgs, Transformer
    from llama_min.model import yarn_attention_factor

    base = dict(SHAPE, max_seq_len=WINDOW, rope_scaling_type="yarn", rope_scaling_factor=4.0,
                rope_original_max_pos=WINDOW)
    for extra, a in (({}, 0.1 * math.log(4) + 1), ({"rope_attention_factor": 1.3}, 1.3),
                     ({"rope_mscale": 1.0, "rope_mscale_all_dim": 0.7},
                      (0.1 * math.log(4) + 1) / (0.07 * math.log(4) + 1))):
        table = Transformer(ModelArgs(**base, **extra)).freqs_cis
        torch.testing.assert_close(table.abs(), torch.full(table.shape, a), atol=1e-6, rtol=1e-6)
    assert yarn_attention_factor(1.0) == 1.0  # no stretch, no sharpening
    assert yarn_attention_factor(4.0, mscale=1.0) == pytest.approx(0.1 * math.log(4) + 1)  # needs both


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    from llama_min.model import base_frequencies, yarn_scale_frequencies

    freqs = base_frequencies(100.0, 32)
    scaled = yarn_scale_frequencies(freqs, 100.0, 4.0, WINDOW)
    assert scaled[0] == freqs[0]  # the ramp starts at pair 0 (low = 0): kept
    torch.testing.assert_close(scaled[9:], freqs[9:] / 4)  # past the ramp (high = 9): interpolated
    assert torch.all((scaled <= freqs) & (scaled >= freqs / 4 * (1 - 1e-6)))


def test_no_scaling_table_is_bit_identical_to_metas():
    """The default path: Meta's precompute_freqs_cis, bit for bit (and llama3 still through use_scaled_rope)."""
    from llama_min import ModelArgs, Transformer
    from llama_min.model import llama3_scale_frequencies

    for theta, hd in ((10000.0, 16), (500000.0, 64), (100000.0, 32)):
        args = ModelArgs(dim=hd * 2, n_layers=1, n_heads=2, vocab_size=8, rope_theta=theta, max_seq_len=300)
        freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        t = torch.arange(600, dtype=torch.float32)
        angles = torch.outer(t, freqs).float()
        assert torch.equal(Transformer(args).freqs_cis, torch.polar(torch.ones_like(angles), angles))
        scaled = ModelArgs(**dict(args.to_dict(), use_scaled_rope=True, rope_scaling_type=None))
        angles = torch.outer(t, llama3_scale_frequencies(freqs, 8.0, 1.0, 4.0, 8192))
        assert torch.equal(Transformer(scaled).freqs_cis, torch.polar(torch.ones_like(angles), angles))


def test_use_scaled_rope_and_llama3_are_one_setting():
    from llama_min import ModelArgs

    meta = ModelArgs(**SHAPE, use_scaled_rope=True)
    named = ModelArgs(**SHAPE, rope_scaling_type="llama3")
    assert meta == named and (meta.use_scaled_rope, meta.rope_scaling_type) == (True, "llama3")
    with pytest.raises(ValueError, match="conflicts"):
        ModelArgs(**SHAPE, use_scaled_rope=True, rope_scaling_type="yarn")


@pytest.mark.parametrize("kind", ["longrope", "ntk", "Linear"])
def test_unsupported_scalings_are_one_line_errors(kind):
    from llama_min import ModelArgs

    with pytest.raises(ValueError) as e:
        ModelArgs(**SHAPE, rope_scaling_type=kind)
    msg = str(e.value)
    assert "\n" not in msg and repr(kind) in msg
    assert all(name in msg for name in ("linear", "dynamic", "yarn", "llama3"))


@pytest.mark.parametrize("name", ["dynamic-x4", "yarn-mscale"])
def test_native_step_uses_the_models_rows(monkeypatch, name):
    """The C decode step takes the model's rows: dynamic's per-length table, yarn's magnitude."""
    from conftest import use_int4_kernel
    from llama_min.runtime import native
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    if not native.enabled():
        pytest.skip("llama_min's C kernels do not build here")
    use_int4_kernel(monkeypatch, "avx2")
    rope, max_pos, fields = CASES[name]
    hf = hf_model(rope, max_pos)
    ref, fast = ours_from(hf, **fields), apply_transforms(ours_from(hf, **fields))
    step = NativeStep(fast)
    tokens = rand_tokens(1, 2 * WINDOW, seed=7)
    with torch.no_grad():
        for m in (ref, fast):
            m.setup_cache(1, 2 * WINDOW)
        prefix = WINDOW - 2
        torch.testing.assert_close(step(tokens[:, :prefix]), ref(tokens[:, :prefix]), atol=1e-5, rtol=1e-5)
        for t in range(prefix, prefix + 6):  # crossing the window one token at a time
            got = step.try_step(tokens[:, t:t + 1], t)
            assert got is not None  # the C path took it
            torch.testing.assert_close(got, ref(tokens[:, t:t + 1], t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, frames", [("dynamic-x4", 0), ("yarn-mscale", 1)])
def test_compiled_step(name, frames):
    """The compiled one-token step: yarn's table (magnitude a) goes into its graph; dynamic's changes with the
    length, so its steps go to the step under it (no frame compiled). Logits as the reference's, across the window."""
    from torch._dynamo.testing import CompileCounter

    from llama_min.runtime.compile import CompiledStep

    torch._dynamo.reset()
    rope, max_pos, fields = CASES[name]
    model = ours_from(hf_model(rope, max_pos), **fields)
    counter = CompileCounter()
    step = CompiledStep(model, backend=counter)
    tokens = rand_tokens(1, WINDOW + 4, seed=8)
    want, got = [], []
    with torch.inference_mode():
        for run, out in ((model, want), (step, got)):
            model.setup_cache(1, WINDOW + 4)
            out.append(run(tokens[:, :WINDOW - 3]))
            out.extend(run(tokens[:, t:t + 1], t) for t in range(WINDOW - 3, WINDOW + 4))
            model.clear_cache()
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == frames
