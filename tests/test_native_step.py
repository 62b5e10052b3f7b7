"""native_step.NativeStep: a decode step through every layer in one C call computes what model.py computes."""

import pytest
import torch

from _tiny import rand_tokens, tiny_model
from conftest import use_int4_kernel


def model(**over):
    return tiny_model(scale=0.2, max_seq_len=64, **over)


def steps(m, tokens, prefill):
    """Logits of a prefill of `prefill` tokens then one token at a time, through the KV cache."""
    m.setup_cache(tokens.shape[0], tokens.shape[1])
    out = [m(tokens[:, :prefill])] + [m(tokens[:, t:t + 1], t) for t in range(prefill, tokens.shape[1])]
    m.clear_cache()
    return torch.cat(out, dim=1)


class CountingLayers:
    """Wraps native.decode_layers to count the steps that took the C path."""

    def __init__(self, monkeypatch):
        from llama_min.runtime import native

        self.calls, real = 0, native.decode_layers

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(native, "decode_layers", counted)


@pytest.fixture
def counter(monkeypatch):
    """The C path available (llama_min's kernels, 4-bit layers in their 'avx2' layout), its steps counted."""
    use_int4_kernel(monkeypatch, "avx2")
    return CountingLayers(monkeypatch)


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4, "tie_word_embeddings": True}])
def test_float32_steps_are_the_reference(counter, over):
    """apply_transforms installs the step on a float32 CPU model; the short prompt (2 rows x 7 tokens) and every
    one-token step of a batch of 2 take the C path and give the untouched reference's logits (1e-5: float32
    rounding order only)."""
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    ref, fast = model(**over), apply_transforms(model(**over))
    assert isinstance(fast.forward, NativeStep)
    tokens = rand_tokens(2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(steps(fast, tokens, 7), steps(ref, tokens, 7), atol=1e-5, rtol=1e-5)
    assert counter.calls == 1 + 24 - 7


def test_a_few_tokens_at_once_attend_causally(counter):
    """k+1 tokens in one call (a speculative check of k = 4 proposals) after a cached prefix: each token sees
    the cache and the new tokens before it, as the reference's causal mask; last_only gives the last row."""
    from llama_min.runtime.transforms import apply_transforms

    ref, fast = model(), apply_transforms(model())
    tokens = rand_tokens(1, 40, seed=8)
    with torch.no_grad():
        for m in (ref, fast):
            m.setup_cache(1, 48)
            m(tokens[:, :35])  # 35 tokens: PyTorch's kernels (>= PREFILL_ROWS), no C call
        assert counter.calls == 0
        torch.testing.assert_close(fast(tokens[:, 35:40], 35), ref(tokens[:, 35:40], 35), atol=1e-5, rtol=1e-5)
        assert counter.calls == 1
        torch.testing.assert_close(fast(tokens[:, 30:33], 30, last_only=True), ref(tokens[:, 30:33], 30)[:, -1:],
                                   atol=1e-5, rtol=1e-5)


def test_unfused_layers_and_separate_gate_up(counter):
    """Layers whose q, k, v (and gate, up) are separate matrices: their outputs are placed side by side."""
    from llama_min.runtime.fast import use_fast_attention, use_native_decode, use_native_linears
    from llama_min.runtime.step import use_native_step

    ref = model()
    fast = use_native_step(use_native_linears(use_native_decode(use_fast_attention(model()))))
    tokens = rand_tokens(2, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(steps(fast, tokens, 5), steps(ref, tokens, 5), atol=1e-5, rtol=1e-5)
    assert counter.calls == 1 + 15


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_steps_are_the_layer_by_layer_steps(counter, quantize):
    """int4 / int8 models: the C step multiplies with the same kernels as the layer-by-layer forward, and the
    most likely next token is the same at every step. The logits agree to 1e-3 of their largest value, not
    to float rounding: both write a product's input as int16 per group of 32 (steps of 1.5e-5 of the group's
    largest value), and SwiGLU's exp (PyTorch's, libm's) may differ in a last bit, which can move a value
    to the next int16 step. The step's own arithmetic is checked to 1e-5 on float32 models above."""
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model(), quantize=quantize)
    tokens = rand_tokens(1, 24, seed=5)
    with torch.no_grad():
        got = steps(fast, tokens, 8)
        assert counter.calls == 1 + 16
        fast.forward = fast.forward.eager  # the model's own (transformed) forward, layer by layer
        want = steps(fast, tokens, 8)
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


class Doubled(torch.nn.Module):
    """A layer wrapped by something the C code knows nothing of (as tensor parallelism wraps wo)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_a_changed_model_is_read_again(counter):
    """The description is checked on every call: a swapped module sends the step to the model's own forward,
    new weights (a replaced .data), a new cache and a cache tensor's new storage are read again, and the
    results stay the reference's."""
    from llama_min.runtime.transforms import apply_transforms

    ref, fast = model(), apply_transforms(model())
    tokens = rand_tokens(1, 12, seed=6)
    with torch.no_grad():
        steps(fast, tokens, 8)
        assert counter.calls == 5
        for m in (ref, fast):
            m.layers[1].attention.wo = Doubled(m.layers[1].attention.wo)
        torch.testing.assert_close(steps(fast, tokens, 8), steps(ref, tokens, 8), atol=1e-5, rtol=1e-5)
        assert counter.calls == 5  # not the C path: it would have skipped the doubling
        for m in (ref, fast):
            m.layers[1].attention.wo = m.layers[1].attention.wo.inner
            m.layers[0].feed_forward.w2.weight.data = m.layers[0].feed_forward.w2.weight.data * -1.5
        torch.testing.assert_close(steps(fast, tokens, 8), steps(ref, tokens, 8), atol=1e-5, rtol=1e-5)
        assert counter.calls == 10
        for m in (ref, fast):  # a cache tensor given new storage mid-generation: the next steps write there
            m.setup_cache(1, 12)
            m(tokens[:, :8])
        for t in range(8, 12):
            cache = fast.layers[t % 2].attention.cache
            cache.k.data = cache.k.data.clone()
            torch.testing.assert_close(fast(tokens[:, t:t + 1], t), ref(tokens[:, t:t + 1], t), atol=1e-5, rtol=1e-5)
        assert counter.calls == 15


def test_gradients_long_prompts_and_no_cache_take_the_models_forward(counter):
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model())
    tokens = rand_tokens(1, 40, seed=7)
    fast.setup_cache(1, 40)
    with torch.no_grad():
        fast(tokens[:, :32])  # a prompt of PREFILL_ROWS tokens: PyTorch's matrix-matrix kernels
    fast(tokens[:, 32:33], 32)  # gradients on: autograd needs the PyTorch operations
    fast.clear_cache()
    with torch.no_grad():
        fast(tokens[:, :3])  # no cache: plain causal attention over the tokens given
    assert counter.calls == 0


def test_the_description_keeps_no_cache_alive(counter):
    """After a generation clears its cache, the step's description does not hold the old cache's memory."""
    import gc
    import weakref

    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model())
    tokens = rand_tokens(1, 10, seed=9)
    fast.setup_cache(1, 10)
    old = weakref.ref(fast.layers[0].attention.cache.k)
    with torch.no_grad():
        fast(tokens[:, :9])
        fast(tokens[:, 9:10], 9)
    assert counter.calls == 2
    fast.clear_cache()
    gc.collect()
    assert old() is None


def test_decode_layers_refuses_operands_that_do_not_fit(monkeypatch):
    from llama_min.runtime import native

    use_int4_kernel(monkeypatch, "avx2")
    freqs = torch.ones(1, 8, dtype=torch.complex64)
    with pytest.raises(ValueError):
        native.decode_layers(None, torch.zeros(2, 64, dtype=torch.float64), 1, (4, 2, 16, 160), 1e-5, freqs, 0, 8)
    with pytest.raises(ValueError):  # a position past the cache
        native.decode_layers(None, torch.zeros(2, 64), 1, (4, 2, 16, 160), 1e-5, freqs, 8, 8)
    with pytest.raises(ValueError):  # freqs rows of another head size
        native.decode_layers(None, torch.zeros(2, 64), 1, (4, 2, 32, 160), 1e-5, freqs, 0, 8)
