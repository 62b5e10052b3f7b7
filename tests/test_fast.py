"""The inference transforms (transforms.py and the modules it names) compute the same numbers as the reference model."""

import pytest
import torch

from _tiny import tiny_model
from llama_min.runtime.linear import TransposedEmbedding, TransposedLinear, onednn_available, transpose_wide_layers
from test_generation import CharTokenizer


def model(**over):
    return tiny_model(scale=0.2, max_seq_len=64, **over)


def test_same_logits_prefill_and_decode():
    for over in ({}, {"tie_word_embeddings": True}):
        ref = model(**over)
        fast = transpose_wide_layers(model(**over))
        tokens = torch.randint(0, 128, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(fast(tokens), ref(tokens), atol=1e-5, rtol=1e-5)
            for m in (ref, fast):
                m.setup_cache(2, 12)
                m(tokens[:, :8])
            for t in range(8, 12):
                torch.testing.assert_close(fast(tokens[:, t:t + 1], t), ref(tokens[:, t:t + 1], t), atol=1e-5, rtol=1e-5)


def test_which_layers_are_transposed():
    m = transpose_wide_layers(model(tie_word_embeddings=True))
    att, ffn = m.layers[0].attention, m.layers[0].feed_forward
    assert isinstance(att.wq, TransposedLinear) and isinstance(att.wo, TransposedLinear)  # 64 -> 64
    assert isinstance(att.wk, torch.nn.Linear)  # 64 -> 32: narrow, kept
    assert isinstance(ffn.w1, TransposedLinear) and isinstance(ffn.w3, TransposedLinear)  # 64 -> 160
    assert isinstance(ffn.w2, torch.nn.Linear)  # 160 -> 64
    assert isinstance(m.output, TransposedLinear) and isinstance(m.tok_embeddings, TransposedEmbedding)
    assert "tok_embeddings.weight" not in m.state_dict()  # the tied matrix is stored once


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this torch")
def test_onednn_layers_same_numbers_and_back():
    """Every float matrix in oneDNN's layout: the same logits (prompt, one token, a few rows at once), the
    tied embedding still reads its table, and dense_twin (what the compiler gets) holds the exact weights."""
    from llama_min.runtime.linear import OneDNNLinear, dense_twin, use_onednn_linears

    for over in ({}, {"tie_word_embeddings": True}):
        ref, fast = model(**over), use_onednn_linears(model(**over))
        assert isinstance(fast.output, OneDNNLinear) and isinstance(fast.layers[0].feed_forward.w2, OneDNNLinear)
        assert not any(type(m) is torch.nn.Linear for m in fast.modules())
        tokens = torch.randint(0, 128, (2, 20))
        with torch.no_grad():
            torch.testing.assert_close(fast(tokens), ref(tokens), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(_steps(fast, tokens, 7), _steps(ref, tokens, 7), atol=1e-5, rtol=1e-5)
            fast.setup_cache(2, 20), ref.setup_cache(2, 20)
            fast(tokens[:, :9]), ref(tokens[:, :9])  # then 5 rows at once, as a speculative check does
            torch.testing.assert_close(fast(tokens[:, 9:14], 9), ref(tokens[:, 9:14], 9), atol=1e-5, rtol=1e-5)
        back = dense_twin(fast)
        assert isinstance(fast.output, OneDNNLinear) and back.layers[0].attention_norm is fast.layers[0].attention_norm
        torch.testing.assert_close(back.output.weight_t.t(), ref.output.weight, atol=0, rtol=0)  # wide: W^T
        torch.testing.assert_close(back.layers[0].feed_forward.w2.weight, ref.layers[0].feed_forward.w2.weight,
                                   atol=0, rtol=0)
        torch.testing.assert_close(back.layers[1].attention.wk.weight, ref.layers[1].attention.wk.weight, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# llama_min's own float32 kernel (native.f32_linear, linear.NativeLinear)
# ------------------------------------------------------------------------------------------------


# 45, 577: K not a multiple of 8 (the last products one by one); K <= 1024 with one row: one weight row at a
# time (dot4: blocks of 32, then of 8, then the rest), above it and with several rows: 8 rows at a time
@pytest.mark.parametrize("k", [8, 45, 64, 577, 1024, 1536])
def test_native_f32_linear_against_float64(monkeypatch, k):
    """Every (row, column) against a float64 product: within float32 summation error, |err| <= 1e-5 *
    sum_k |x_k w_k| (K eps = 9e-5 is the worst case for K = 1536; a wrong or missing term is of order 1).
    N = 5, 8, 13, 960 covers blocks of 8 rows and the rows after the last block; M up to 31 rows."""
    from conftest import use_int4_kernel
    from llama_min.runtime import native

    use_int4_kernel(monkeypatch, "avx2")  # the same library: skip locally / fail under CI without it
    g = torch.Generator().manual_seed(k)
    for n in (5, 8, 13, 960):
        w = torch.randn(n, k, generator=g)
        for m in (1, 3, 31):
            x = torch.randn(m, k, generator=g)
            got = native.f32_linear(x, w)
            want = (x.double() @ w.double().t())
            bound = 1e-5 * (x.double().abs() @ w.double().abs().t())
            assert got.shape == (m, n) and got.dtype == torch.float32
            assert ((got.double() - want).abs() <= bound).all(), (n, m, (got.double() - want).abs().max().item())
    with pytest.raises(ValueError):
        native.f32_linear(torch.randn(2, k, dtype=torch.float64), w)  # a wrong dtype is refused, not read
    nan = torch.zeros(1, k)
    nan[0, k // 2] = float("nan")
    assert native.f32_linear(nan, w).isnan().all()


def test_native_linears_same_numbers_as_reference(monkeypatch):
    """Every float matrix through the AVX2 kernel: a prompt (>= PREFILL_ROWS rows: F.linear), one token at a
    time, 5 rows at once (a speculative check) and a batch of 2 give the reference's logits; the weights are
    the reference's tensors themselves (a tied embedding still shares its table)."""
    from conftest import use_int4_kernel
    from llama_min.runtime.linear import NativeLinear, use_native_linears

    use_int4_kernel(monkeypatch, "avx2")
    for over in ({}, {"tie_word_embeddings": True}):
        ref, fast = model(**over), model(**over)
        want_out = fast.output.weight
        use_native_linears(fast)
        assert not any(type(m) is torch.nn.Linear for m in fast.modules())
        assert isinstance(fast.output, NativeLinear) and fast.output.weight is want_out
        if over:
            assert fast.tok_embeddings.weight is fast.output.weight
        tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(fast(tokens), ref(tokens), atol=1e-5, rtol=1e-5)  # 80 rows: F.linear
            torch.testing.assert_close(_steps(fast, tokens, 7), _steps(ref, tokens, 7), atol=1e-5, rtol=1e-5)
            fast.setup_cache(2, 40), ref.setup_cache(2, 40)
            fast(tokens[:, :9]), ref(tokens[:, :9])
            torch.testing.assert_close(fast(tokens[:, 9:14], 9), ref(tokens[:, 9:14], 9), atol=1e-5, rtol=1e-5)


def test_float32_cpu_build_picks_the_native_kernel_else_onednn(monkeypatch):
    """apply_transforms: NativeLinear where the kernel builds; LLAMA_MIN_NATIVE=0 gives oneDNN's layout."""
    from conftest import use_int4_kernel
    from llama_min.runtime.linear import NativeLinear, OneDNNLinear
    from llama_min.runtime.transforms import apply_transforms

    use_int4_kernel(monkeypatch, "avx2")
    m = apply_transforms(model())
    assert isinstance(m.output, NativeLinear) and isinstance(m.layers[0].attention.wqkv, NativeLinear)
    monkeypatch.setenv("LLAMA_MIN_NATIVE", "0")
    m = apply_transforms(model())
    assert isinstance(m.output, OneDNNLinear if onednn_available() else TransposedLinear)


def test_native_rms_norm_is_the_reference_norm(monkeypatch):
    from conftest import use_int4_kernel
    from llama_min.runtime import native
    from llama_min.model import RMSNorm

    use_int4_kernel(monkeypatch, "avx2")
    for d in (64, 577):  # 577: the last numbers one by one
        norm = RMSNorm(d, eps=1e-5)
        with torch.no_grad():
            norm.weight.normal_(1, 0.1)
            x = torch.randn(2, 3, d) * 10
            torch.testing.assert_close(native.rms_norm(x, norm.weight, norm.eps), norm(x), atol=1e-6, rtol=1e-6)


def test_native_swiglu_is_silu_times_up(monkeypatch):
    """native.swiglu on a fused gate|up output: PyTorch's F.silu(gate) * up, including the far ends of e^x
    (clamped in the kernel) and a hidden size that leaves a tail of 3 done one by one."""
    from conftest import use_int4_kernel
    from llama_min.runtime import native
    import torch.nn.functional as F

    use_int4_kernel(monkeypatch, "avx2")
    g = torch.Generator().manual_seed(0)
    for hidden in (64, 19):
        gate_up = torch.randn(2, 5, 2 * hidden, generator=g) * 6
        gate_up[0, 0, :8] = torch.tensor([-200.0, -90.0, -88.0, -30.0, 30.0, 88.0, 90.0, 200.0])
        gate, up = gate_up.split(hidden, dim=-1)
        got = native.swiglu(gate_up, hidden)
        assert got.shape == (2, 5, hidden)
        torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        native.swiglu(gate_up, hidden + 1)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_native_decode_attention_is_rope_cache_and_attention(monkeypatch, heads):
    """decode_attention on q, k, v slices of one fused row, two batch rows, at position 0 and 13: the cache
    row written as model.py's RoPE + KVCache.update write it, and the output as its attention over 0..pos."""
    from conftest import use_int4_kernel
    from llama_min.runtime import native
    from llama_min.model import KVCache, apply_rotary_emb, attention_math, precompute_freqs_cis, repeat_kv

    use_int4_kernel(monkeypatch, "avx2")
    H, K = heads
    hd, B = 16, 2
    freqs = precompute_freqs_cis(1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd)), 40)
    g = torch.Generator().manual_seed(H * 10 + K)
    mine, ref = KVCache(3, 20, K, hd, torch.float32), KVCache(3, 20, K, hd, torch.float32)
    history = torch.randn(3, 13, K, hd, generator=g)
    for c in (mine, ref):
        c.update(0, history, history * 0.5)
    for pos in (0, 13):
        qkv = torch.randn(B, 1, (H + 2 * K) * hd, generator=g)
        q, k, v = qkv.split([H * hd, K * hd, K * hd], dim=-1)
        q, k, v = q.view(B, 1, H, hd), k.view(B, 1, K, hd), v.view(B, 1, K, hd)
        got = native.decode_attention(q, k, v, freqs[pos:pos + 1], pos, mine.k, mine.v)
        rq, rk = apply_rotary_emb(q, k, freqs[pos:pos + 1])
        ck, cv = ref.update(pos, rk, v)
        ck, cv = repeat_kv(ck, H // K).transpose(1, 2), repeat_kv(cv, H // K).transpose(1, 2)
        want = attention_math(rq.transpose(1, 2), ck, cv, None).transpose(1, 2).reshape(B, -1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.k, ref.k, atol=1e-6, rtol=1e-6)
        assert torch.equal(mine.v, ref.v) and torch.equal(mine.k[2], ref.k[2])  # row 2 (not in the batch) untouched
    with pytest.raises(ValueError):
        native.decode_attention(q, k, v, freqs[20:21], 20, mine.k, mine.v)  # past the cache: refused


def test_native_decode_same_numbers_as_reference(monkeypatch):
    """use_native_decode on the fused model: the reference's logits over a prompt and one-token steps (batch of
    2, GQA and one KV head); the norms hold the reference's weights."""
    from conftest import use_int4_kernel
    from llama_min.runtime.fusion import FusedAttention, fuse_projections
    from llama_min.runtime.native_decode import NativeRMSNorm, use_native_decode

    use_int4_kernel(monkeypatch, "avx2")
    for over in ({}, {"n_kv_heads": 1}):
        ref, fast = model(**over), model(**over)
        use_native_decode(fuse_projections(fast))
        assert isinstance(fast.layers[0].attention, FusedAttention) and fast.layers[0].attention.native_decode
        assert fast.layers[0].feed_forward.native_swiglu
        assert isinstance(fast.norm, NativeRMSNorm) and torch.equal(fast.norm.weight, ref.norm.weight)
        tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(_steps(fast, tokens, 7), _steps(ref, tokens, 7), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# FastAttention and the whole transform chain, against the untouched reference
# ------------------------------------------------------------------------------------------------


def _steps(m, tokens, prefill):
    """Logits of a prefill of `prefill` tokens then one token at a time, through the KV cache."""
    m.setup_cache(tokens.shape[0], tokens.shape[1])
    out = [m(tokens[:, :prefill])] + [m(tokens[:, t:t + 1], t) for t in range(prefill, tokens.shape[1])]
    m.clear_cache()
    return torch.cat(out, dim=1)


def test_fast_attention_same_numbers_as_reference():
    from llama_min.runtime.attention import FastAttention, use_fast_attention

    for over in ({}, {"n_kv_heads": 4}, {"n_kv_heads": 1}):
        ref, fast = model(**over), use_fast_attention(model(**over))
        assert isinstance(fast.layers[0].attention, FastAttention)
        tokens = torch.randint(0, 128, (2, 20))
        with torch.no_grad():
            torch.testing.assert_close(fast(tokens), ref(tokens), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(_steps(fast, tokens, 7), _steps(ref, tokens, 7), atol=1e-5, rtol=1e-5)
            # a multi-token chunk at an offset takes the masked path
            for m in (ref, fast):
                m.setup_cache(2, 20)
                m(tokens[:, :5])
            torch.testing.assert_close(fast(tokens[:, 5:20], 5), ref(tokens[:, 5:20], 5), atol=1e-5, rtol=1e-5)


def _reference_classes():
    import llama_min.model as ref

    return {obj for obj in vars(ref).values() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)} | {
        torch.nn.Linear, torch.nn.Embedding, torch.nn.ModuleList}


def _built(tmp_path, **kw):
    """Llama.build on an own-format folder holding `model()`'s weights, with a stand-in tokenizer file."""
    from llama_min import Llama, save_checkpoint

    m = model()
    folder = tmp_path / "ckpt"
    if not folder.exists():
        save_checkpoint(folder, m.params, m.state_dict())
    import llama_min.text.tokenizer as tk

    orig = tk.load_tokenizer
    try:
        tk.load_tokenizer = lambda path, **kw: CharTokenizer()
        return Llama.build(folder, max_seq_len=64, device="cpu", dtype=torch.float32, **kw)
    finally:
        tk.load_tokenizer = orig


def test_optimize_false_is_exactly_the_reference(tmp_path):
    """optimize=False holds only model.py's classes; the optimized (float32 and int8) builds agree with it."""
    ref = _built(tmp_path, optimize=False)
    assert {type(mod) for mod in ref.model.modules()} <= _reference_classes()
    fast = _built(tmp_path, optimize=True)
    assert any(type(mod) not in _reference_classes() for mod in fast.model.modules())
    int8 = _built(tmp_path, optimize=True, quantize="int8")
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        want = _steps(ref.model, tokens, 9)
        torch.testing.assert_close(_steps(fast.model, tokens, 9), want, atol=1e-4, rtol=1e-4)  # float rounding
        # int8: each weight rounded to half a step of its row's max/127, and the CPU int8 kernel takes bf16
        # activations (8-bit mantissa, ~0.4%), compounded over 2 random layers. Measured here: mean |diff|
        # ~2.6% of the mean |logit|, max ~9% of the largest logit. Bounds: 5% and 15%.
        diff = (_steps(int8.model, tokens, 9) - want).abs()
        assert 0 < diff.mean() < 0.05 * want.abs().mean()
        assert diff.max() < 0.15 * want.abs().max()


# ------------------------------------------------------------------------------------------------
# Fused projections (q/k/v in one product, w1/w3 in one)
# ------------------------------------------------------------------------------------------------


def test_fused_projections_same_logits_and_no_second_copy():
    import gc
    import weakref

    from llama_min.runtime.fusion import FusedAttention, FusedFeedForward, fuse_projections

    for transposed in (False, True):
        for over in ({}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "tie_word_embeddings": True}):
            ref, fused = model(**over), model(**over)
            originals = [weakref.ref(m.weight) for layer in fused.layers
                         for m in (layer.attention.wq, layer.attention.wv, layer.feed_forward.w1)]
            fuse_projections(fused, transposed=transposed)
            gc.collect()
            assert all(r() is None for r in originals)  # the unfused weights are gone, not kept beside
            att, ffn = fused.layers[0].attention, fused.layers[0].feed_forward
            assert isinstance(att, FusedAttention) and isinstance(ffn, FusedFeedForward)
            assert isinstance(att.wqkv, TransposedLinear) == transposed
            keys = set(fused.state_dict())
            assert not any(k.endswith((".wq.weight", ".wk.weight", ".wv.weight", ".w1.weight", ".w3.weight"))
                           for k in keys)
            n = lambda m: sum(t.numel() for t in m.state_dict().values())  # noqa: E731
            assert n(fused) == n(ref)
            tokens = torch.randint(0, 128, (2, 20))
            with torch.no_grad():
                torch.testing.assert_close(fused(tokens), ref(tokens), atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(_steps(fused, tokens, 7), _steps(ref, tokens, 7), atol=1e-4, rtol=1e-4)


def test_fused_weights_hold_the_stacked_rows():
    """Rows of wqkv are Wq, then Wk, then Wv; rows of w13 are W1 then W3 (read back from the fused layers)."""
    from llama_min.runtime.fusion import fuse_projections

    ref, fused = model(), fuse_projections(model(), transposed=True)
    att, ffn = ref.layers[1].attention, ref.layers[1].feed_forward
    wqkv = fused.layers[1].attention.wqkv.weight_t.t()
    torch.testing.assert_close(wqkv, torch.cat([att.wq.weight, att.wk.weight, att.wv.weight]), atol=0, rtol=0)
    w13 = fused.layers[1].feed_forward.w13.weight_t.t()
    torch.testing.assert_close(w13, torch.cat([ffn.w1.weight, ffn.w3.weight]), atol=0, rtol=0)


@pytest.mark.parametrize("quantize", ["int8", "int4", "int4-64"])
def test_quantized_projections_fuse_to_the_same_numbers(quantize):
    """q/k/v and w1/w3 of a quantized model stack into one Int8Linear / Int4Linear holding the very same
    stored values (codes, scales), so the logits equal the unfused quantized model's up to kernel rounding."""
    from llama_min.runtime.fusion import FusedAttention, FusedFeedForward, fuse_projections
    from llama_min.runtime.quantize import Int4Linear, Int8Linear, quantize_model

    # groups of 64 take PyTorch's CPU layout, whose tiles are 64 rows with AVX-512: every matrix a whole
    # number of them (q, k, v 64 rows each, w1 and w3 192) so that it stacks on any CPU
    over = {"n_kv_heads": 4, "hidden_dim": 192} if quantize == "int4-64" else {}
    unfused = quantize_model(model(**over), quantize)
    att, ffn = unfused.layers[1].attention, unfused.layers[1].feed_forward
    want_qkv = torch.cat([att.wq.dequantize(), att.wk.dequantize(), att.wv.dequantize()])
    want_13 = torch.cat([ffn.w1.dequantize(), ffn.w3.dequantize()])
    fused = fuse_projections(quantize_model(model(**over), quantize))
    f_att, f_ffn = fused.layers[1].attention, fused.layers[1].feed_forward
    kind = Int8Linear if quantize == "int8" else Int4Linear
    assert isinstance(f_att, FusedAttention) and isinstance(f_ffn, FusedFeedForward)
    assert type(f_att.wqkv) is kind and type(f_ffn.w13) is kind
    torch.testing.assert_close(f_att.wqkv.dequantize(), want_qkv, atol=0, rtol=0)
    torch.testing.assert_close(f_ffn.w13.dequantize(), want_13, atol=0, rtol=0)
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        a, b = _steps(fused, tokens, 7), _steps(unfused, tokens, 7)
    # The int8 output layer rounds its input and its logits to bf16, so float32-level differences before it
    # (the fused attention's order of operations) can move a logit by a bf16 step; a wrong stacking moves
    # logits by about their own size.
    torch.testing.assert_close(a, b, atol=2.0**-7 * b.abs().max().item(), rtol=0)
    assert (a - b).abs().mean() < 1e-3 * b.abs().mean()


def test_quantized_layers_that_do_not_stack_stay_apart(monkeypatch):
    """int4 rows of 16 (k and v of a 1-KV-head model here) would mix PyTorch's CPU kernel's tiles of 32 (64
    with AVX-512) rows: not fused; w1 and w3 of 192 rows are whole tiles: fused. (The 'avx2' layout keeps
    rows apart, so it stacks any rows.)"""
    from conftest import use_int4_kernel
    from llama_min.runtime.attention import FastAttention
    from llama_min.runtime.transforms import apply_transforms

    use_int4_kernel(monkeypatch, "torch")

    m = apply_transforms(model(n_kv_heads=1, hidden_dim=192), quantize="int4")
    assert type(m.layers[0].attention) is FastAttention
    assert type(m.layers[0].feed_forward).__name__ == "FusedFeedForward"


@pytest.mark.slow
def test_smollm2_optimized_32_greedy_tokens_as_the_reference(smollm2, smollm2_path):
    """The default model, float32 CPU, every transform (fused projections, W^T layout, FastAttention) against
    model.py's classes: the same 32 greedy tokens, logits of the prompt within 1e-4."""
    from llama_min import Llama
    from llama_min.runtime.fusion import FusedAttention

    assert isinstance(smollm2.model.layers[0].attention, FusedAttention)
    ref = Llama.build(smollm2_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype=torch.float32,
                      optimize=False)
    tok = smollm2.tokenizer
    prompt = tok.encode("Gravity is the force that", bos=tok.add_bos, eos=False)
    with torch.no_grad():
        x = torch.tensor([prompt])
        torch.testing.assert_close(smollm2.model(x), ref.model(x), atol=1e-4, rtol=1e-4)
    want, _ = ref.generate([prompt], max_gen_len=32, temperature=0, stop_ids=set())
    got, _ = smollm2.generate([prompt], max_gen_len=32, temperature=0, stop_ids=set())
    assert got == want and len(got[0]) == 32
