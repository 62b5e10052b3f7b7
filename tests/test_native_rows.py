"""NativeStep.step_rows (native.decode_rows): one C decode step for rows at positions of their own (a server's
rows). Per row it must give what the single-row C step gives for that row alone (logits and cache), and what
the model's own forward gives, within the tolerances tests/test_native_step.py uses for the same weights;
a row must never read another row's cache or its own positions past its length."""

import pytest
import torch

from _tiny import tiny_model
from conftest import CallCounter, use_int4_kernel
from llama_min.model import KVCache

S = 48  # cache length
PREFIXES = (7, 19, 0, 33, 2)  # ragged rows: tokens already in each row's cache (33: a prompt PyTorch's kernels run)
KINDS = ("float32", "float32-dynamic", "int8", "int4", "packed-q4_1")
# dynamic RoPE scaling with a window of 16: rows past it rotate by their own length's table (model.rope_rows)
DYNAMIC = dict(rope_scaling_type="dynamic", rope_scaling_factor=4.0, rope_original_max_pos=16)


@pytest.fixture
def counter(monkeypatch):
    use_int4_kernel(monkeypatch, "avx2")
    return CallCounter(monkeypatch, "decode_rows")


def build(kind, tmp_path):
    """(the model the C step runs, the model whose own forward is the oracle, the tolerance of test_native_step
    for these weights as a function of the oracle's logits)."""
    from llama_min.runtime.transforms import apply_transforms

    if kind.startswith("float32"):  # model.py's own classes, untransformed: float32 rounding order only
        over = DYNAMIC if kind == "float32-dynamic" else {}
        return apply_transforms(tiny_model(scale=0.2, max_seq_len=64, **over)), \
            tiny_model(scale=0.2, max_seq_len=64, **over), lambda want: 1e-5
    if kind == "packed-q4_1":  # a Q4_1 GGUF file loaded packed, as the default model is
        from test_gguf_packed import write_tiny
        from gguf import GGMLQuantizationType as Q
        from llama_min.runtime.packed import load_gguf_packed

        path = write_tiny(tmp_path / "m.gguf", Q.Q4_1)
        fast = apply_transforms(load_gguf_packed(path, "cpu", max_seq_len=64).eval().requires_grad_(False))
    else:
        fast = apply_transforms(tiny_model(scale=0.2, max_seq_len=64), quantize=kind)
    # int16 activations in both paths; the model's own forward is layer by layer (test_native_step's bound)
    return fast, fast, lambda want: 1e-3 * want.abs().max().item()


def point(m, ks, vs):
    """Point every layer's cache at the given (B, S, K, hd) tensors (views, like serve's slots)."""
    for layer, k, v in zip(m.layers, ks, vs):
        c = KVCache.__new__(KVCache)
        c.k, c.v = k, v
        layer.attention.cache = c


def filled_caches(m, step, seqs):
    """Per layer (k, v) of len(seqs) rows x S positions, random everywhere (what other requests left), then row
    b's prefix seqs[b] written by the single-row step into row b."""
    g = torch.Generator().manual_seed(11)
    att = m.layers[0].attention
    shape = (len(seqs), S, att.n_kv_heads, att.head_dim)
    ks = [torch.randn(shape, generator=g) for _ in m.layers]
    vs = [torch.randn(shape, generator=g) for _ in m.layers]
    for b, seq in enumerate(seqs):
        if seq:
            point(m, [k[b:b + 1] for k in ks], [v[b:b + 1] for v in vs])
            step(torch.tensor([seq]), 0)
    return ks, vs


def ragged(seed=2, vocab=128):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PREFIXES]
    new = torch.randint(0, vocab, (len(seqs),), generator=g)
    return seqs, new, torch.tensor([len(s) for s in seqs])


def pointed_step(kind: str, tmp_path):
    """A `kind` model's NativeStep over ragged rows whose caches hold random values and are pointed at by the
    model's layers: a namespace of the model, its oracle and tolerance, the step, the rows (seqs, new tokens,
    positions), the caches (ks, vs) and copies of them as they were (before)."""
    from types import SimpleNamespace

    from llama_min.runtime.step import NativeStep

    fast, oracle, tolerance = build(kind, tmp_path)
    step = NativeStep(fast)
    seqs, new, positions = ragged()
    with torch.no_grad():
        ks, vs = filled_caches(fast, step, seqs)
        before = [t.clone() for t in ks + vs]
        point(fast, ks, vs)
    return SimpleNamespace(fast=fast, oracle=oracle, tolerance=tolerance, step=step, seqs=seqs, new=new,
                           positions=positions, ks=ks, vs=vs, before=before)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_at_their_own_positions_equal_the_single_row_step_and_the_models_forward(counter, kind, tmp_path):
    p = pointed_step(kind, tmp_path)
    fast, oracle, tolerance, step, seqs, new, positions = p.fast, p.oracle, p.tolerance, p.step, p.seqs, p.new, \
        p.positions
    ks, vs, before = p.ks, p.vs, p.before
    with torch.no_grad():
        got = step.step_rows(new, positions)  # (B, V): all rows in one C call
        assert counter.calls == 1 and got.shape == (len(seqs), fast.params.vocab_size)
        after_rows = [t.clone() for t in ks + vs]

        # the single-row C step, row by row, on the same starting caches
        for t, b in zip(ks + vs, before):
            t.copy_(b)
        single = []
        for b, p in enumerate(positions.tolist()):
            point(fast, [k[b:b + 1] for k in ks], [v[b:b + 1] for v in vs])
            single.append(step.try_step(new[b].view(1, 1), p)[0, -1])
        single = torch.stack(single)
        tol = tolerance(single)
        torch.testing.assert_close(got, single, atol=tol, rtol=1e-5 if kind.startswith("float32") else 0)
        assert torch.equal(got.argmax(-1), single.argmax(-1))
        rows = torch.arange(len(seqs))
        for t, b, r in zip(ks + vs, before, after_rows):
            torch.testing.assert_close(r[rows, positions], t[rows, positions], atol=tol, rtol=1e-5)
            written = torch.zeros(b.shape[:2], dtype=torch.bool)
            written[rows, positions] = True
            assert torch.equal(r[~written], b[~written])  # nothing else touched: no row wrote another's

        # the model's own forward, each row alone with a cache of its own
        want = []
        for seq, t in zip(seqs, new.tolist()):
            oracle.setup_cache(1, S)
            if seq:
                oracle(torch.tensor([seq]), 0)
            want.append(oracle(torch.tensor([[t]]), len(seq))[0, -1])
        oracle.clear_cache()
        want = torch.stack(want)
        torch.testing.assert_close(got, want, atol=tolerance(want), rtol=1e-5 if kind.startswith("float32") else 0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_row_at_another_rows_position_gives_other_logits(counter, tmp_path):
    """The check above can fail: a row fed at the wrong position (here row 1 at row 0's) differs by far more
    than the tolerance; and a row reading its cache past its length (what other requests left) would too."""
    p = pointed_step("float32", tmp_path)
    step, new, positions, ks, vs, before = p.step, p.new, p.positions, p.ks, p.vs, p.before
    with torch.no_grad():
        right = step.step_rows(new, positions)
        for t, b in zip(ks + vs, before):
            t.copy_(b)
        wrong = step.step_rows(new, torch.tensor([positions[0], positions[0], *positions[2:]]))
    assert (right[1] - wrong[1]).abs().max().item() > 1e-2
    torch.testing.assert_close(right[0], wrong[0], atol=1e-6, rtol=0)


def test_calls_the_c_code_does_not_take_return_none_and_write_nothing(counter, tmp_path):
    p = pointed_step("float32", tmp_path)
    fast, step, new, positions, ks, vs, before = p.fast, p.step, p.new, p.positions, p.ks, p.vs, p.before
    with torch.no_grad():
        assert step.step_rows(new, torch.tensor([0, 1, 2, S, 4])) is None  # a position past the cache
        assert step.step_rows(torch.cat([new, new]), torch.cat([positions, positions])) is None  # rows > cache rows
        fast.layers[0].attention.cache = None
        assert step.step_rows(new, positions) is None  # a layer without a cache
    assert counter.calls == 0
    assert all(torch.equal(t, b) for t, b in zip(ks + vs, before))
    with pytest.raises(ValueError):  # the wrapper checks what it is given
        from llama_min.runtime import native

        native.decode_rows(None, torch.zeros(2, 64), (4, 2, 16, 160), 1e-5, torch.ones(2, 8, dtype=torch.complex64),
                           torch.tensor([0, 8]), 8)
