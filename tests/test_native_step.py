"""step.NativeStep: a decode step through every layer in one C call computes what model.py computes; which step
Llama chooses; a weight changed after a step is read by the next one."""

import pytest
import torch

from _tiny import rand_tokens, tiny_model
from conftest import CallCounter, use_int4_kernel


def model(**over):
    return tiny_model(scale=0.2, max_seq_len=64, **over)


def steps(m, tokens, prefill, step=None):
    """Logits of a prefill of `prefill` tokens then one token at a time, through the KV cache, by `step`
    (default: the model's own forward)."""
    run = step if step is not None else m
    m.setup_cache(tokens.shape[0], tokens.shape[1])
    out = [run(tokens[:, :prefill])] + [run(tokens[:, t:t + 1], t) for t in range(prefill, tokens.shape[1])]
    m.clear_cache()
    return torch.cat(out, dim=1)


@pytest.fixture
def counter(monkeypatch):
    """The C path available (llama_min's kernels, 4-bit layers in their 'avx2' layout), its steps counted."""
    use_int4_kernel(monkeypatch, "avx2")
    return CallCounter(monkeypatch, "decode_layers")


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4, "tie_word_embeddings": True}])
def test_float32_steps_are_the_reference(counter, over):
    """choose_step picks the C step for a transformed float32 CPU model; the short prompt (2 rows x 7 tokens) and
    every one-token step of a batch of 2 take the C path and give the untouched reference's logits (1e-5:
    float32 rounding order only)."""
    from llama_min.runtime.step import NativeStep, choose_step
    from llama_min.runtime.transforms import apply_transforms

    ref, fast = model(**over), apply_transforms(model(**over))
    step = choose_step(fast)
    assert isinstance(step, NativeStep) and step.name == "native"
    assert "forward" not in vars(fast)  # the model is left as it is: the step is held beside it
    tokens = rand_tokens(2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(steps(fast, tokens, 7, step), steps(ref, tokens, 7), atol=1e-5, rtol=1e-5)
    assert counter.calls == 1 + 24 - 7


def test_a_few_tokens_at_once_attend_causally(counter):
    """k+1 tokens in one call (a speculative check of k = 4 proposals) after a cached prefix: each token sees
    the cache and the new tokens before it, as the reference's causal mask; last_only gives the last row."""
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    ref, fast = model(), apply_transforms(model())
    step = NativeStep(fast)
    tokens = rand_tokens(1, 40, seed=8)
    with torch.no_grad():
        for m, run in ((ref, ref), (fast, step)):
            m.setup_cache(1, 48)
            run(tokens[:, :35])  # 35 tokens: PyTorch's kernels (>= PREFILL_ROWS), no C call
        assert counter.calls == 0
        torch.testing.assert_close(step(tokens[:, 35:40], 35), ref(tokens[:, 35:40], 35), atol=1e-5, rtol=1e-5)
        assert counter.calls == 1
        torch.testing.assert_close(step(tokens[:, 30:33], 30, last_only=True), ref(tokens[:, 30:33], 30)[:, -1:],
                                   atol=1e-5, rtol=1e-5)


def test_unfused_layers_and_separate_gate_up(counter):
    """Layers whose q, k, v (and gate, up) are separate matrices: their outputs are placed side by side."""
    from llama_min.runtime.attention import use_fast_attention
    from llama_min.runtime.linear import use_native_linears
    from llama_min.runtime.native_decode import use_native_decode
    from llama_min.runtime.step import NativeStep

    ref = model()
    fast = use_native_linears(use_native_decode(use_fast_attention(model())))
    tokens = rand_tokens(2, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(steps(fast, tokens, 5, NativeStep(fast)), steps(ref, tokens, 5), atol=1e-5, rtol=1e-5)
    assert counter.calls == 1 + 15


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_steps_are_the_layer_by_layer_steps(counter, quantize):
    """int4 / int8 models: the C step multiplies with the same kernels as the layer-by-layer forward, and the
    most likely next token is the same at every step. The logits agree to 1e-3 of their largest value, not
    to float rounding: both write a product's input as int16 per group of 32 (steps of 1.5e-5 of the group's
    largest value), and SwiGLU's exp (PyTorch's, libm's) may differ in a last bit, which can move a value
    to the next int16 step. The step's own arithmetic is checked to 1e-5 on float32 models above."""
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model(), quantize=quantize)
    tokens = rand_tokens(1, 24, seed=5)
    with torch.no_grad():
        got = steps(fast, tokens, 8, NativeStep(fast))
        assert counter.calls == 1 + 16
        want = steps(fast, tokens, 8)  # the model's own (transformed) forward, layer by layer
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
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    ref, fast = model(), apply_transforms(model())
    step = NativeStep(fast)
    tokens = rand_tokens(1, 12, seed=6)
    with torch.no_grad():
        steps(fast, tokens, 8, step)
        assert counter.calls == 5
        for m in (ref, fast):
            m.layers[1].attention.wo = Doubled(m.layers[1].attention.wo)
        torch.testing.assert_close(steps(fast, tokens, 8, step), steps(ref, tokens, 8), atol=1e-5, rtol=1e-5)
        assert counter.calls == 5  # not the C path: it would have skipped the doubling
        for m in (ref, fast):
            m.layers[1].attention.wo = m.layers[1].attention.wo.inner
            m.layers[0].feed_forward.w2.weight.data = m.layers[0].feed_forward.w2.weight.data * -1.5
        torch.testing.assert_close(steps(fast, tokens, 8, step), steps(ref, tokens, 8), atol=1e-5, rtol=1e-5)
        assert counter.calls == 10
        for m, run in ((ref, ref), (fast, step)):  # a cache tensor given new storage mid-generation: read anew
            m.setup_cache(1, 12)
            run(tokens[:, :8])
        for t in range(8, 12):
            cache = fast.layers[t % 2].attention.cache
            cache.k.data = cache.k.data.clone()
            torch.testing.assert_close(step(tokens[:, t:t + 1], t), ref(tokens[:, t:t + 1], t), atol=1e-5, rtol=1e-5)
        assert counter.calls == 15


def test_gradients_long_prompts_and_no_cache_take_the_models_forward(counter):
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model())
    step = NativeStep(fast)
    tokens = rand_tokens(1, 40, seed=7)
    fast.setup_cache(1, 40)
    with torch.no_grad():
        step(tokens[:, :32])  # a prompt of PREFILL_ROWS tokens: PyTorch's matrix-matrix kernels
    step(tokens[:, 32:33], 32)  # gradients on: autograd needs the PyTorch operations
    fast.clear_cache()
    with torch.no_grad():
        step(tokens[:, :3])  # no cache: plain causal attention over the tokens given
    assert counter.calls == 0


def test_the_description_keeps_no_cache_alive(counter):
    """After a generation clears its cache, the step's description does not hold the old cache's memory."""
    import gc
    import weakref

    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model())
    step = NativeStep(fast)
    tokens = rand_tokens(1, 10, seed=9)
    fast.setup_cache(1, 10)
    old = weakref.ref(fast.layers[0].attention.cache.k)
    with torch.no_grad():
        step(tokens[:, :9])
        step(tokens[:, 9:10], 9)
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


# ---------------------------------------------------------------------------------------------
# The step Llama holds: chosen at build time, by name; weights changed after a step are read anew
# ---------------------------------------------------------------------------------------------


def test_a_weight_changed_after_a_step_is_read_by_the_next(counter):
    """Llama holds the C step for a transformed float32 model. Weights loaded in place (load_state_dict) after
    a step are what the next step multiplies by; after `.to()` moved every weight to new memory (float64 and
    back, the old storage freed) the steps read the new memory (no stale or freed pointer): each time the
    C step gives what the model's own forward gives on the same weights."""
    import gc

    from llama_min import Llama
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model())
    llama = Llama(fast, None, max_seq_len=64, max_batch_size=1)
    assert llama.step.name == "native"
    tokens = rand_tokens(1, 12, seed=10)
    with torch.no_grad():
        before = steps(fast, tokens, 8, llama.step)
        calls = counter.calls
        fast.load_state_dict({k: v * 1.5 if k.endswith("w2.weight") else v for k, v in fast.state_dict().items()})
        after = steps(fast, tokens, 8, llama.step)
        assert counter.calls == 2 * calls  # the C path, on the new values
        assert (after - before).abs().max() > 1e-2
        torch.testing.assert_close(after, steps(fast, tokens, 8), atol=1e-5, rtol=1e-5)
        fast.to(torch.float64).to(torch.float32)  # the same values in new memory, the old storage freed
        gc.collect()
        torch.testing.assert_close(steps(fast, tokens, 8, llama.step), after, atol=1e-5, rtol=1e-5)
        assert counter.calls == 3 * calls


def test_inside_unchanged_model_the_model_is_checked_at_the_first_step_only(counter, monkeypatch):
    """Llama.generate runs its loop inside step.unchanged_model(): the walk over the layers (_Reads.unchanged) runs
    once for the whole generation, not once per token; the tokens are those of the model's own forward; and
    after the block a replaced module is seen again at the next call."""
    from llama_min import Llama
    from llama_min.runtime import step as step_module
    from llama_min.runtime.step import ReferenceStep
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(model())
    llama = Llama(fast, None, max_seq_len=64, max_batch_size=1)
    checks = CallCounter(monkeypatch, "unchanged", owner=step_module._Reads)
    with torch.no_grad():
        out, _ = llama.generate([[1, 5, 9]], max_gen_len=12, temperature=0, stop_ids=set())
        want, _ = Llama(fast, None, max_seq_len=64, max_batch_size=1, step=ReferenceStep(fast)).generate(
            [[1, 5, 9]], max_gen_len=12, temperature=0, stop_ids=set())
    assert out == want and counter.calls >= 11
    assert checks.calls <= 1  # (none when the first C call rebuilt the description: new caches)
    tokens = rand_tokens(1, 12, seed=6)
    with torch.no_grad():
        steps(fast, tokens, 8, llama.step)
        calls = counter.calls
        fast.layers[1].attention.wo = Doubled(fast.layers[1].attention.wo)  # outside the block: noticed
        steps(fast, tokens, 8, llama.step)
    assert counter.calls == calls


@pytest.mark.parametrize("last_only", [False, True])
def test_a_long_prompt_goes_in_by_parts_with_the_same_logits(counter, last_only):
    """A prompt longer than PROMPT_CHUNK into a KV cache is fed in parts of at most PROMPT_CHUNK tokens (no pass
    holds a longer prompt's activations) and gives the one-pass forward's logits; the decode steps after it too."""
    from llama_min.runtime.step import PROMPT_CHUNK, choose_step
    from llama_min.runtime.transforms import apply_transforms

    fast = apply_transforms(tiny_model(scale=0.2, max_seq_len=1024))
    step = choose_step(fast)
    T = 2 * PROMPT_CHUNK + 37
    tokens = rand_tokens(2, T + 3, seed=12)
    seen = []
    fast.layers[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        fast.setup_cache(2, T + 3)
        want = fast(tokens[:, :T], 0, last_only=last_only)
        want_next = [fast(tokens[:, t:t + 1], t) for t in range(T, T + 3)]
        seen.clear()
        fast.setup_cache(2, T + 3)
        got = step(tokens[:, :T], 0, last_only=last_only)
        got_next = [step(tokens[:, t:t + 1], t) for t in range(T, T + 3)]
        fast.clear_cache()
    assert seen == [PROMPT_CHUNK, PROMPT_CHUNK, 37]  # (the decode steps took the C path: no hook there)
    assert got.shape == want.shape == (2, 1 if last_only else T, fast.params.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_next, 1), torch.cat(want_next, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.assets
def test_llama_names_the_step_it_chose(smollm2, smollm2_path, monkeypatch):
    """SmolLM2 float32 on this CPU: the C step; the packed GGUF (the default way to run it): the C step;
    optimize=False (model.py's own classes): the reference forward, writing the same greedy tokens; without
    llama_min's kernels (LLAMA_MIN_NATIVE=0) float32 runs the model's own (transformed) forward."""
    from llama_min import Llama

    use_int4_kernel(monkeypatch, "avx2")
    packed = Llama.build(smollm2_path, max_seq_len=64, max_batch_size=1, device="cpu")
    plain = Llama.build(smollm2_path, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32,
                        optimize=False)
    assert (smollm2.step.name, packed.step.name, plain.step.name) == ("native", "native", "reference")
    prompt = [smollm2.tokenizer.encode("The capital of France is", bos=False, eos=False)]
    assert smollm2.generate(prompt, 8, temperature=0)[0] == plain.generate(prompt, 8, temperature=0)[0]
    monkeypatch.setenv("LLAMA_MIN_NATIVE", "0")
    assert Llama(smollm2.model, smollm2.tokenizer, 64, 1).step.name == "reference"
