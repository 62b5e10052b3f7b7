"""int8 / int4 weight-only quantization: exact math on the quantized weights, bounded error, real-model agreement."""

import pytest
import torch
import torch.nn.functional as F

from conftest import use_int4_kernel
from llama_min.runtime import native
from llama_min.runtime.quantize import (Int4Linear, Int8Linear, parse_quantize, quantize_groupwise_int4, quantize_int4,
                                quantize_int8, quantize_per_channel)


def test_per_channel_round_trip_error_is_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different ranges
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))


def test_int8_linear_equals_dequantized_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=False)
    qlin = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 128)
    want = F.linear(x, qlin.weight.float() * qlin.scales[:, None])  # the same int8 weights, float math
    got = qlin(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    # the CPU kernel takes bf16 activations: agreement to bf16 precision
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.02)
    assert (got - F.linear(x, lin.weight)).abs().max() < 0.1 * want.abs().max()
    long = torch.randn(2, 40, 128)  # many rows (a prompt): float GEMM on the dequantized weights
    torch.testing.assert_close(qlin(long), F.linear(long, qlin.weight.float() * qlin.scales[:, None]))


def test_quantize_int8_replaces_every_linear():
    from llama_min import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96))
    quantize_int8(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1


PROMPTS = ["Once upon a time, there was a little", "The capital of France is", "def fibonacci(n):",
           "The three primary colors are"]


def logit_diffs(ref, quantized, ids, label):
    """|logits of ref - logits of quantized| per prompt (printed with the logit scale)."""
    with torch.no_grad():
        for row in ids:
            a, b = ref.model(torch.tensor([row])), quantized.model(torch.tensor([row]))
            diff = (a - b).abs()
            print(f"[{label}] max|dlogits| {diff.max():.2f}, mean {diff.mean():.3f} (logit scale {a.abs().max():.0f})")
            yield diff


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_int8_agrees_with_float32(smollm2, smollm2_path):
    from llama_min import Llama

    ref = smollm2
    q8 = Llama.build(smollm2_path, max_seq_len=128, max_batch_size=4, device="cpu", dtype=torch.float32,
                     quantize="int8")
    assert q8.weight_bytes_per_token() < 0.3 * ref.weight_bytes_per_token()
    ids = [ref.tokenizer.encode(p) for p in PROMPTS]
    for diff in logit_diffs(ref, q8, ids, "int8"):
        assert diff.mean() < 0.5 and diff.max() < 3.0
    out_ref, _ = ref.generate(ids, max_gen_len=24, temperature=0, stop_ids=set())
    out_q8, _ = q8.generate(ids, max_gen_len=24, temperature=0, stop_ids=set())
    agree = [next((k for k, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(out_ref, out_q8)]
    print(f"[int8] greedy tokens equal to float32 before the first difference: {agree}")
    assert min(agree) >= 3 and sum(agree) >= 40
    assert "Paris" in q8.tokenizer.decode(out_q8[1])


# ---------------------------------------------------------------------------------------------
# int4, per group
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_groupwise_codes_follow_min_max_and_err_half_a_step(g):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.logspace(-2, 1, 16)[:, None] + 0.3  # rows of very different ranges
    q, s, z = quantize_groupwise_int4(w, g)
    groups = w.view(16, -1, g)
    lo, hi = groups.min(-1).values, groups.max(-1).values  # computed here, by hand
    torch.testing.assert_close(s, (hi - lo) / 15)
    torch.testing.assert_close(z, lo + 8 * s)
    qg = q.view(16, -1, g)
    assert q.dtype == torch.uint8 and q.max() <= 15
    assert torch.all(qg.min(-1).values == 0) and torch.all(qg.max(-1).values == 15)  # the ends of each range
    recon = (qg.float() - 8) * s[..., None] + z[..., None]
    assert torch.all((recon - groups).abs() <= s[..., None] / 2 * (1 + 1e-5))


def _reference_weights(q, s, z, g, layout="cpu"):
    """The weights as the kernels store them: (q - 8) * scale + zero with scale and zero rounded to bf16;
    'avx2': q * scale + min with scale and min = zero - 8 scale rounded to fp16."""
    n, k = q.shape
    q = q.float().view(n, -1, g)
    if layout == "avx2":
        return (q * s.half().float()[..., None] + (z - 8 * s).half().float()[..., None]).view(n, k)
    sb, zb = s.bfloat16().float(), z.bfloat16().float()
    return ((q - 8) * sb[..., None] + zb[..., None]).view(n, k)


@pytest.mark.parametrize("kernel", ["avx2", "torch"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("n", [48, 40])  # 48 rows: PyTorch's CPU kernel; 40 (not a multiple of 16): 'plain'
def test_int4_linear_multiplies_by_its_codes(g, n, kernel, monkeypatch):
    use_int4_kernel(monkeypatch, kernel)
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, n, bias=False)
    qlin = Int4Linear.from_linear(lin, g)
    want_layout = "avx2" if kernel == "avx2" and g == 32 else "cpu" if n % 16 == 0 else "plain"
    assert qlin.layout == want_layout and qlin.packing.name == want_layout
    assert qlin.native == (want_layout == "avx2")  # what the C decode step asks of a 4-bit layer
    want_w = _reference_weights(*quantize_groupwise_int4(lin.weight, g), g, qlin.layout)
    assert torch.equal(qlin.dequantize(), want_w)
    if qlin.layout == "avx2":  # the C dequantizer (for prompts) agrees with the torch one bit for bit
        assert torch.equal(native.q4_dequantize(qlin.weight, qlin.scales_and_zeros), want_w)
    for rows in (1, 5, 40):  # the 'avx2' kernel below PREFILL_ROWS rows, dequantize + F.linear from there on
        x = torch.randn(rows, 256)
        got, want = qlin(x), F.linear(x, want_w)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        if qlin.layout == "plain":
            torch.testing.assert_close(got, want)
        elif qlin.layout == "avx2":  # activations as int16 per group of 32: |dx| <= max|x of the group| / 65534
            xmax = x.view(rows, -1, 32).abs().amax(-1).repeat_interleave(32, dim=1)
            tol = (xmax / 65534) @ want_w.abs().t() * 1.01 + 1e-6 * (x.abs() @ want_w.abs().t()) + 1e-6
            assert torch.all((got - want).abs() <= tol)
        else:  # PyTorch's CPU kernel rounds x and its output to bf16 (relative 2^-8 each)
            tol = 2.0**-8 * (x.abs() @ want_w.abs().t()) + 2.0**-8 * want.abs() + 1e-6
            assert torch.all((got - want).abs() <= tol)
        # against the float weights: each weight moved by at most half a step of its group
        assert (got - F.linear(x, lin.weight)).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("n", [832, 336])  # 832: chunks of 256 + the rest; 336: not whole tiles, packed at once
def test_int4_cpu_layout_packed_in_chunks_is_the_whole(n, monkeypatch):
    """Rows packed chunk by chunk (here 256 at a time) hold whole tiles of PyTorch's CPU layout (32 rows on
    AVX2, 64 with AVX-512): the layer multiplies by exactly its codes. (Chunks of 32 rows on an AVX-512
    machine once moved TinyLlama's w2 outputs by more than their own size.)"""
    from llama_min.runtime import int4_layouts

    use_int4_kernel(monkeypatch, "torch")
    monkeypatch.setattr(int4_layouts, "CHUNK_WEIGHTS", 1)
    torch.manual_seed(2)
    lin = torch.nn.Linear(128, n, bias=False)
    qlin = Int4Linear.from_linear(lin, 32)
    assert qlin.layout == "cpu"
    assert torch.equal(qlin.dequantize(), _reference_weights(*quantize_groupwise_int4(lin.weight, 32), 32, "cpu"))


def test_int4_cpu_layers_stack_only_in_whole_tiles(monkeypatch):
    """Two 'cpu'-layout layers of 96 rows: stacked only where 96 rows are whole tiles (32-row tiles), and
    then the stack multiplies by both layers' weights."""
    from llama_min.runtime.int4_layouts import cpu_int4_tile_rows
    from llama_min.runtime.quantize import can_fuse_quantized, fuse_quantized

    use_int4_kernel(monkeypatch, "torch")
    torch.manual_seed(3)
    a, b = (Int4Linear.from_linear(torch.nn.Linear(128, 96, bias=False), 32) for _ in range(2))
    assert can_fuse_quantized([a, b]) == (96 % cpu_int4_tile_rows() == 0)
    stacked = fuse_quantized([a, b])  # built whether or not it may be: right only with whole tiles
    right = torch.equal(stacked.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert right == can_fuse_quantized([a, b])


def test_quantize_int4_replaces_linears_and_agrees_with_float():
    from llama_min import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192))
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
        quantize_int4(model, 64)  # w2 has in_features 192 = 3 x 64; all layers qualify
        got = model(tokens)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 2 * 7
    assert isinstance(model.output, Int8Linear)  # the output projection keeps 8 bits
    # 4 bits per weight: each weight moves by up to half a step, (max - min) / 30 of its group; for
    # uniform-initialised weights that is ~3.3% of a group's range, ~6% of a weight's typical size, as
    # independent errors. Through 2 layers and the output that gives logits within ~10% of their scale.
    err = (got - ref).abs()
    print(f"[int4] relative |dlogits| mean {err.mean() / ref.abs().mean():.4f}, max {err.max() / ref.abs().max():.4f}")
    assert err.mean() < 0.1 * ref.abs().mean() and err.max() < 0.2 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_quantize_int4_keeps_layers_whose_width_the_group_does_not_divide():
    from llama_min import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=128, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=96))
    quantize_int4(model, 64)
    assert type(model.layers[0].feed_forward.w2) is torch.nn.Linear  # in_features 96
    assert isinstance(model.layers[0].feed_forward.w1, Int4Linear)


def test_parse_quantize():
    from llama_min.errors import LlamaMinError

    assert parse_quantize(None) == (None, None) and parse_quantize("int8") == ("int8", None)
    assert parse_quantize("int4") == ("int4", 32) and parse_quantize("int4-128") == ("int4", 128)
    for bad in ("int3", "int4-16", "int8-32", "int4-x"):
        with pytest.raises(LlamaMinError, match="int4"):
            parse_quantize(bad)


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_int4_agrees_with_float32(smollm2, smollm2_path):
    from llama_min import Llama

    ref = smollm2
    q4 = Llama.build(smollm2_path, max_seq_len=128, max_batch_size=4, device="cpu", dtype=torch.float32,
                     quantize="int4")
    assert q4.weight_bytes_per_token() < 0.25 * ref.weight_bytes_per_token()
    ids = [ref.tokenizer.encode(p) for p in PROMPTS]
    for diff in logit_diffs(ref, q4, ids, "int4"):
        # the file is Q4_1 already: int4 of its dequantized weights re-grids values that were on a 4-bit
        # grid of their own, so the change is at most half a step of the new group per weight
        assert diff.mean() < 1.0 and diff.max() < 6.0
    out_q4, _ = q4.generate(ids, max_gen_len=24, temperature=0, stop_ids=set())
    assert "Paris" in q4.tokenizer.decode(out_q4[1])


@pytest.mark.parametrize("k", [32, 96, 256, 576, 1056])  # groups of 8 at once, then the rest one by one
def test_avx2_kernel_for_any_number_of_groups(k, monkeypatch):
    use_int4_kernel(monkeypatch, "avx2")
    torch.manual_seed(k)
    qlin = Int4Linear.from_linear(torch.nn.Linear(k, 24, bias=False))
    w = qlin.dequantize()
    x = torch.randn(3, k) * torch.logspace(-2, 2, k)  # groups of very different sizes
    got = native.q4_linear(x, qlin.weight, qlin.scales_and_zeros)
    xmax = x.view(3, -1, 32).abs().amax(-1).repeat_interleave(32, dim=1)
    tol = (xmax / 65534) @ w.abs().t() * 1.01 + 1e-6 * (x.abs() @ w.abs().t())
    assert torch.all((got - F.linear(x, w)).abs() <= tol)


@pytest.mark.parametrize("k", [32, 128, 576, 1056])
def test_avx2_int8_kernel_within_the_int16_activation_bound(k, monkeypatch):
    """q8_linear against the float product of the same int8 weights: within the int16 rounding of each group
    of 32 activations (max|x_g| / 65534 per weight), times the row's scale; NaN reaches its row. Int8Linear
    uses it for a few rows where it builds, PyTorch's kernel with LLAMA_MIN_NATIVE=0."""
    use_int4_kernel(monkeypatch, "avx2")
    torch.manual_seed(k)
    qlin = Int8Linear.from_linear(torch.nn.Linear(k, 40, bias=False))
    assert qlin.native
    w = qlin.dequantize()
    x = torch.randn(3, k) * torch.logspace(-2, 2, k)
    got = native.q8_linear(x, qlin.weight, qlin.scales)
    xmax = x.view(3, -1, 32).abs().amax(-1).repeat_interleave(32, dim=1)
    tol = (xmax / 65534) @ w.abs().t() * 1.01 + 1e-6 * (x.abs() @ w.abs().t())
    assert torch.all((got - F.linear(x, w)).abs() <= tol)
    torch.testing.assert_close(qlin(x[None]), got[None])
    x[1, 7] = float("nan")
    assert native.q8_linear(x, qlin.weight, qlin.scales)[1].isnan().all()
    use_int4_kernel(monkeypatch, "torch")
    assert not Int8Linear.from_linear(torch.nn.Linear(k, 8, bias=False)).native
    assert not Int8Linear.from_linear(torch.nn.Linear(48, 8, bias=False)).native  # 48: not groups of 32


def test_avx2_kernel_propagates_nan_and_inf(monkeypatch):
    """A non-finite activation makes its output row NaN, as a float product would; other rows are untouched."""
    use_int4_kernel(monkeypatch, "avx2")
    qlin = Int4Linear.from_linear(torch.nn.Linear(64, 16, bias=False))
    x = torch.randn(3, 64)
    x[0, 5], x[2, 40] = float("nan"), float("inf")
    y = native.q4_linear(x, qlin.weight, qlin.scales_and_zeros)
    assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all()
    torch.testing.assert_close(y[1], F.linear(x[1], qlin.dequantize()), atol=1e-4, rtol=1e-4)


def test_avx2_kernel_falls_back_with_one_line_when_it_cannot_be_built(monkeypatch, tmp_path, capfd):
    """A compiler that fails: PyTorch's kernel is used, after one line on stderr naming the problem."""
    monkeypatch.delenv("LLAMA_MIN_NATIVE", raising=False)
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "false")
    native._library.cache_clear()
    try:
        if not native._cpu_supports():
            pytest.skip("not an AVX2 Linux machine: the kernel is never tried here")
        assert not native.enabled()
        assert Int4Linear.from_linear(torch.nn.Linear(64, 32, bias=False)).layout == "cpu"
        err = capfd.readouterr().err
        assert err.count("could not build the AVX2 kernels") == 1 and "using PyTorch's" in err
    finally:
        native._library.cache_clear()
