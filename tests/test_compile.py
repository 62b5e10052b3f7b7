"""The compiled one-token decode step (compile.CompiledStep, Llama.compile): one graph, no graph breaks, no
recompilation across positions or cache lengths, the same logits as the reference model."""

import pytest
import torch

from _tiny import tiny_model
from llama_min.runtime.compile import CompiledStep, rope_real
from llama_min.model import apply_rotary_emb, precompute_freqs_cis, rope_frequencies
from llama_min.runtime.transforms import apply_transforms


def test_real_rope_is_the_complex_rotation():
    """out_even = x_even cos - x_odd sin, out_odd = x_even sin + x_odd cos equals the complex product."""
    from llama_min import ModelArgs

    freqs_cis = precompute_freqs_cis(rope_frequencies(ModelArgs(dim=64, n_heads=4, rope_theta=500000.0)), 300)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 4, 16, generator=g), torch.randn(2, 7, 2, 16, generator=g)
    rows = freqs_cis[290:297]  # late positions: large angles
    want_q, want_k = apply_rotary_emb(q, k, rows)
    torch.testing.assert_close(rope_real(q, rows.real, rows.imag), want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rope_real(k, rows.real, rows.imag), want_k, atol=1e-6, rtol=1e-6)
    # by hand, pair 0 of position 1 (angle theta_0 = 1 rad): (1, 0) -> (cos 1, sin 1)
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0] = 1.0
    one = freqs_cis[1:2]
    out = rope_real(x, one.real, one.imag)[0, 0, 0]
    torch.testing.assert_close(out[:2], torch.tensor([0.5403023, 0.8414710]))


def _models(quantize=None, **over):
    ref = tiny_model(scale=0.2, **over)
    return ref, apply_transforms(tiny_model(scale=0.2, **over), quantize=quantize)


def _decode(m, tokens, prefill, step=None):
    """Logits of one-token steps by `step` (default: the model's forward) after a prefill of `prefill` tokens,
    through a cache of len(tokens)."""
    run = step if step is not None else m
    m.setup_cache(tokens.shape[0], tokens.shape[1])
    run(tokens[:, :prefill])
    out = [run(tokens[:, t:t + 1], t) for t in range(prefill, tokens.shape[1])]
    m.clear_cache()
    return torch.cat(out, dim=1)


def _assert_one_graph(m):
    """torch._dynamo.explain on one decode step of m: one graph, no break."""
    decode = CompiledStep(m, backend="eager")
    m.setup_cache(1, 16)
    caches = [layer.attention.cache for layer in m.layers]
    with torch.inference_mode():
        explained = torch._dynamo.explain(decode.step)(
            torch.tensor([[5]]), torch.tensor([3]), [c.k for c in caches], [c.v for c in caches])
    m.clear_cache()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_decode_step_is_one_graph_without_breaks():
    """The optimized model (fused projections, and the AVX2 float32 kernel where it builds) and model.py's own
    classes alike."""
    for m in _models():
        _assert_one_graph(m)


def test_native_float32_layers_compile_into_the_graph(monkeypatch):
    """The AVX2 float32 kernel is a custom operator: one compiled frame, a batch of 2 rows through it too,
    the reference's logits."""
    from conftest import use_int4_kernel
    from torch._dynamo.testing import CompileCounter

    from llama_min.runtime.linear import NativeLinear

    use_int4_kernel(monkeypatch, "avx2")
    torch._dynamo.reset()
    ref, fast = _models()
    assert isinstance(fast.output, NativeLinear)
    counter = CompileCounter()
    step = CompiledStep(fast, backend=counter)
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(_decode(fast, tokens, 6, step), _decode(ref, tokens, 6), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1


def test_avx2_int4_layers_compile_into_the_graph(monkeypatch):
    """The 'avx2' 4-bit kernel is a custom operator: one graph, no break, the eager model's logits."""
    from conftest import use_int4_kernel
    from torch._dynamo.testing import CompileCounter

    use_int4_kernel(monkeypatch, "avx2")
    torch._dynamo.reset()
    _, m = _models(quantize="int4")
    assert m.layers[0].attention.wqkv.layout == "avx2"
    _assert_one_graph(m)
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = _decode(m, tokens, 6)
        counter = CompileCounter()
        got = _decode(m, tokens, 6, CompiledStep(m, backend=counter))
    assert counter.frame_count == 1
    # the step's real-arithmetic RoPE differs from the eager complex one at float32 rounding, which the int8
    # output layer's bf16 input and output can turn into a bf16 step of a logit
    torch.testing.assert_close(got, want, atol=2.0**-7 * want.abs().max().item(), rtol=0)
    assert (got - want).abs().mean() < 1e-3 * want.abs().mean()


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 1}, {"tie_word_embeddings": True}])
def test_no_recompilation_across_positions_and_cache_lengths(over):
    """Every position and two cache lengths run through one compiled frame; logits as the reference's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    ref, fast = _models(**over)
    counter = CompileCounter()
    step = CompiledStep(fast, backend=counter)  # over the model's own forward: every one-token step compiled
    with torch.inference_mode():
        for length, prefill in ((20, 6), (33, 9)):
            tokens = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(_decode(fast, tokens, prefill, step), _decode(ref, tokens, prefill),
                                       atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1


def test_batches_run_eager_on_onednn_weights(monkeypatch):
    """Several rows on float32 CPU weights in oneDNN's layout (chosen where llama_min's own kernel is off)
    skip the graph (oneDNN reads a weight once for every row); one row goes through it. Logits as the
    reference's either way."""
    from torch._dynamo.testing import CompileCounter

    from llama_min.runtime.linear import OneDNNLinear, onednn_available

    if not onednn_available():
        pytest.skip("no oneDNN in this torch")
    monkeypatch.setenv("LLAMA_MIN_NATIVE", "0")
    torch._dynamo.reset()
    ref, fast = _models()
    assert isinstance(fast.output, OneDNNLinear)
    counter = CompileCounter()
    step = CompiledStep(fast, backend=counter)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(_decode(fast, tokens, 6, step), _decode(ref, tokens, 6), atol=1e-4, rtol=1e-4)
        assert counter.frame_count == 0
        torch.testing.assert_close(_decode(fast, tokens[:1], 6, step), _decode(ref, tokens[:1], 6),
                                   atol=1e-4, rtol=1e-4)
        assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_compiled_step_same_logits_and_greedy_tokens():
    """The real compiler (inductor, what Llama.compile uses): logits within 1e-4 of the reference, and a greedy
    generation through Llama.compile gives the eager model's tokens."""
    from llama_min.generation import Llama
    from llama_min.runtime.step import ReferenceStep
    from test_generation import CharTokenizer

    torch._dynamo.reset()
    ref, fast = _models()
    # over the model's own forward, not llama_min's C step (which the compiled step would keep)
    llama = Llama(fast, CharTokenizer(), max_seq_len=128, max_batch_size=1, step=ReferenceStep(fast)).compile()
    assert llama.compile_s > 0 and isinstance(llama.step, CompiledStep) and llama.step.name == "compiled"
    tokens = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(_decode(fast, tokens, 8, llama.step), _decode(ref, tokens, 8), atol=1e-4, rtol=1e-4)
    prompt = tokens[0, :8].tolist()
    got, _ = llama.generate([prompt], max_gen_len=16, temperature=0, stop_ids=set())
    want, _ = Llama(ref, CharTokenizer(), max_seq_len=128, max_batch_size=1).generate(
        [prompt], max_gen_len=16, temperature=0, stop_ids=set())
    assert got == want


def test_compile_keeps_the_native_step_where_it_takes_the_call(monkeypatch):
    """A model with llama_min's C step (step.NativeStep): compiled one-token steps stay on it (no frame is
    compiled), logits as the reference's."""
    from conftest import use_int4_kernel
    from torch._dynamo.testing import CompileCounter

    from llama_min.runtime.step import NativeStep, choose_step

    use_int4_kernel(monkeypatch, "avx2")
    torch._dynamo.reset()
    ref, fast = _models()
    native = choose_step(fast)
    assert isinstance(native, NativeStep)
    counter = CompileCounter()
    step = CompiledStep(fast, native, backend=counter)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(_decode(fast, tokens, 6, step), _decode(ref, tokens, 6), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 0
