"""The model's own semantics: RoPE properties, GQA, KV cache, SDPA vs explicit math, bf16, training."""

import math

import pytest
import torch

from llama_min import ModelArgs, Transformer
from llama_min.checkpoint import build_transformer
from _tiny import TINY, rand_tokens, tiny_model
from llama_min.model import (
    apply_rotary_emb,
    attention_math,
    causal_mask,
    llama3_scale_frequencies,
    precompute_freqs_cis,
    repeat_kv,
    rope_frequencies,
)

# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def rotate(x, positions, hd=16, base=10000.0):
    """x: (T, hd) one head; rotate row t by position positions[t]."""
    freqs = rope_frequencies(ModelArgs(dim=hd, n_heads=1, rope_theta=base))
    table = precompute_freqs_cis(freqs, int(max(positions)) + 1)[positions]  # (T, hd/2)
    q, _ = apply_rotary_emb(x[None, :, None, :], x[None, :, None, :], table)
    return q[0, :, 0, :]


def test_rotation_keeps_norms():
    x = torch.randn(50, 16)
    y = rotate(x, list(range(0, 5000, 100)))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(x[1:], y[1:])  # and it does rotate


def test_qk_depends_only_on_relative_distance():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    for offset in (0, 1, 7, 300):
        scores = [rotate(q[None], [m + offset])[0] @ rotate(k[None], [m])[0] for m in (0, 5, 123, 4000)]
        # float32 angles at positions ~4000 carry ~1e-4 rad of rounding
        torch.testing.assert_close(torch.stack(scores), scores[0].expand(4), atol=1e-3, rtol=1e-4)
    # ... while different offsets give different scores
    s1 = rotate(q[None], [10])[0] @ rotate(k[None], [0])[0]
    s2 = rotate(q[None], [11])[0] @ rotate(k[None], [0])[0]
    assert abs(s1 - s2) > 1e-3


def test_complex_form_equals_rotation_matrices():
    """Pair i at position m is multiplied by the 2x2 matrix [[cos, -sin], [sin, cos]] of m*theta_i."""
    hd, base = 16, 10000.0
    x = torch.randn(30, hd, dtype=torch.float64)
    positions = list(range(0, 3000, 100))
    want = torch.empty_like(x)
    for t, m in enumerate(positions):
        for i in range(hd // 2):
            a = m * base ** (-2 * i / hd)
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            want[t, 2 * i : 2 * i + 2] = rot @ x[t, 2 * i : 2 * i + 2]
    got = rotate(x.float(), positions, hd, base).double()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)  # float32 angles up to m = 2900


def test_pairs_turn_fast_to_slow():
    freqs = rope_frequencies(ModelArgs(dim=128, n_heads=1))
    assert freqs[0] == 1.0 and torch.all(freqs[1:] < freqs[:-1])
    assert math.isclose(freqs[-1].item(), 10000 ** (-126 / 128), rel_tol=1e-5)


def test_freqs_cis_angles_in_float32_and_unit():
    freqs = rope_frequencies(ModelArgs(dim=64, n_heads=1, rope_theta=500000.0))
    table = precompute_freqs_cis(freqs, 9000)
    assert table.dtype == torch.complex64 and table.shape == (9000, 32)
    torch.testing.assert_close(table.abs(), torch.ones(9000, 32))
    exact = torch.outer(torch.arange(9000, dtype=torch.float64), freqs.double())
    err = (torch.angle(table).double() - torch.remainder(exact + math.pi, 2 * math.pi) + math.pi).abs()
    assert torch.minimum(err, 2 * math.pi - err).max() < 1e-2


def test_llama3_scaling_branches():
    """Short wavelengths kept, long ones divided by the factor, the middle band blended."""
    freqs = rope_frequencies(ModelArgs(dim=128, n_heads=1, rope_theta=500000.0))
    for factor in (8.0, 32.0):
        scaled = llama3_scale_frequencies(freqs, factor, 1.0, 4.0, 8192)
        wavelen = 2 * math.pi / freqs
        high, low = wavelen < 8192 / 4, wavelen > 8192
        torch.testing.assert_close(scaled[high], freqs[high])
        torch.testing.assert_close(scaled[low], freqs[low] / factor)
        mid = ~(high | low)
        assert mid.any() and torch.all(scaled[mid] < freqs[mid]) and torch.all(scaled[mid] > freqs[mid] / factor)
    args = ModelArgs(dim=128, n_heads=1, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0)
    torch.testing.assert_close(rope_frequencies(args), llama3_scale_frequencies(freqs, 32.0, 1.0, 4.0, 8192))


def test_freqs_cis_survives_bf16_cast():
    model = tiny_model().to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64
    assert model.freqs_cis.imag.abs().max() > 0.5


# ------------------------------------------------------------------------------------------------
# Attention pieces
# ------------------------------------------------------------------------------------------------


def test_repeat_kv_equals_repeat_interleave():
    x = torch.randn(2, 5, 3, 8)
    assert torch.equal(repeat_kv(x, 4), torch.repeat_interleave(x, 4, dim=2))
    assert repeat_kv(x, 1) is x


def test_causal_mask_with_cached_prefix():
    m = causal_mask(3, 2)
    assert m.shape == (3, 5)
    assert torch.equal(torch.isinf(m), torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]).bool())


def test_sdpa_equals_explicit_math(monkeypatch):
    """The model's fused-kernel attention equals the written-out softmax form, whole model, within rounding."""
    model = tiny_model()
    tokens = rand_tokens()
    with torch.no_grad():
        fused = model(tokens)
        monkeypatch.setattr("llama_min.model.attention", attention_math)
        explicit = model(tokens)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_attention_math_matches_sdpa_with_mask():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = causal_mask(3, 4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_math(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit", [False, True])
def test_kv_cache_one_token_at_a_time(explicit, monkeypatch):
    model = tiny_model()
    if explicit:
        monkeypatch.setattr("llama_min.model.attention", attention_math)
    tokens = rand_tokens(n=30)
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 30)
        steps = [model(tokens[:, :10])]  # prefill
        steps += [model(tokens[:, t : t + 1], start_pos=t) for t in range(10, 30)]
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_multi_token_chunk_at_offset():
    """A T > 1 step at start_pos > 0 needs the (T, p+T) mask; the old square triu(p+1) mask fails this."""
    model = tiny_model(seed=2)
    tokens = rand_tokens(n=40, seed=5)
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 40)
        chunks = [model(tokens[:, a:b], start_pos=a) for a, b in ((0, 7), (7, 20), (20, 21), (21, 40))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_logits():
    model = tiny_model()
    tokens = rand_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])


def test_cache_sized_to_request():
    model = tiny_model(max_seq_len=4096)
    model.setup_cache(1, 50)
    assert model.layers[0].attention.cache.k.shape == (1, 50, 2, 16)
    assert model.cache_len == 50
    model.clear_cache()
    assert model.cache_len == 0


# ------------------------------------------------------------------------------------------------
# bf16 and training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 4}, {"tie_word_embeddings": True, "rope_theta": 5e5}])
def test_bf16_greedy_agrees_with_float32(over):
    model = tiny_model(seed=4, **over)
    tokens = rand_tokens(n=48, seed=9)
    with torch.no_grad():
        ref = model(tokens)
        low = build_transformer(model.params, model.state_dict(), dtype=torch.bfloat16).eval()
        got = low(tokens)
    assert low.layers[0].attention.wq.weight.dtype == torch.bfloat16 and got.dtype == torch.float32
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.2  # positions where float32 has a clear winner
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert (got - ref).abs().max() < 0.5


def test_trains_without_cache():
    model = tiny_model().train()
    tokens = rand_tokens(n=33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_tied_weights_share_one_parameter():
    model = Transformer(ModelArgs(**dict(TINY, tie_word_embeddings=True)))
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in set(model.parameters()))


def test_model_args_from_params_json():
    args = ModelArgs.from_dict({"model": {"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 10, "new_key": 3}})
    assert (args.dim, args.n_heads, args.kv_heads, args.hd) == (8, 2, 2, 4)
