"""runtime/blocks.py: Q4_0 / Q4_1 / Q8_0 matrices multiplied where the GGUF file holds them, and the prompt
GEMM by panels (linear.prompt_by_panels) that every packed layer shares.

References: `gguf.quants` (the gguf package) encodes the blocks and decodes them to the float weights; the
products are checked against float32 products with those weights, within bounds derived from what each
kernel rounds."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from pathlib import Path

from _tiny import rand_tokens
from conftest import CallCounter, use_int4_kernel
from llama_min.runtime import native
from llama_min.runtime.blocks import BlockEmbedding, BlockLinear, TiledLinear
from llama_min.runtime.linear import PREFILL_ROWS, prompt_by_panels
from llama_min.runtime.quantize import Int4Linear, Int8Linear

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    use_int4_kernel(monkeypatch, "avx2")  # llama_min's C kernels (skips where they cannot build, fails in CI)


def block_layer(qtype, n=96, k=320, seed=0):
    """A BlockLinear of random weights stored as qtype (K = 320: 10 blocks, so the kernels' tails of fewer
    than 8 blocks run too), and the float32 weights the file means."""
    w = (0.1 * np.random.default_rng(seed).standard_normal((n, k)) + 0.01).astype(np.float32)
    raw = quantize(w, qtype)
    ref = torch.from_numpy(dequantize(raw, qtype).astype(np.float32))
    return BlockLinear(torch.from_numpy(raw.copy()), qtype.name, k), ref


def int16_bound(x: torch.Tensor, w: torch.Tensor, levels: int = 32767) -> torch.Tensor:
    """|y - x W^T| for x rounded to int16 per group of 32 (step s = max|x_g| / 32767, error <= s/2 each):
    at most sum_g (s_g / 2) sum_{j in g} |W[n, j]|, plus float rounding. (M, N). levels=127: int8."""
    m, k = x.shape
    s = x.view(m, k // 32, 32).abs().amax(-1) / levels  # (M, G)
    wg = w.abs().view(w.shape[0], k // 32, 32).sum(-1)  # (N, G)
    return (s / 2) @ wg.t() * 1.001 + 1e-5 * (x.abs() @ w.abs().t())


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 3, PREFILL_ROWS - 1])
def test_decode_rows_within_the_int16_rounding_of_the_activations(qtype, rows):
    lin, w = block_layer(qtype)
    x = torch.randn(rows, w.shape[1])
    got, want = lin(x), x @ w.t()
    err = (got - want).abs()
    assert torch.all(err <= int16_bound(x, w)), err.max()
    assert err.max() > 0  # the int16 path really ran (a float path would be far closer)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [PREFILL_ROWS, 77])
def test_prompt_is_the_float_product_of_the_files_weights(qtype, rows):
    """A prompt's product: float32 GEMMs on the exactly dequantized weights, panel by panel: float rounding."""
    lin, w = block_layer(qtype)
    x = torch.randn(rows, w.shape[1])
    torch.testing.assert_close(lin(x), x @ w.t(), atol=1e-5, rtol=1e-5)


def test_panels_cover_every_row_once(monkeypatch):
    """prompt_by_panels with panels much smaller than N (and N not a multiple of them) = one whole product."""
    import llama_min.runtime.linear as linear

    monkeypatch.setattr(linear, "PANEL_WEIGHTS", 7 * 64)  # 7 rows of K = 64 a panel
    w, x = torch.randn(45, 64), torch.randn(40, 64)
    calls = []

    def rows(start, count, out):
        calls.append((start, count))
        out.copy_(w[start : start + count])
        return out

    torch.testing.assert_close(prompt_by_panels(x, 45, rows), x @ w.t(), atol=1e-5, rtol=1e-5)
    assert calls == [(r, min(16, 45 - r)) for r in range(0, 45, 16)]  # at least 16 rows a panel


@pytest.mark.parametrize("quantize_spec", ["int4", "int8"])
def test_quantized_layers_prompts_by_panels_equal_their_dequantized_product(quantize_spec):
    """Int4Linear (AVX2 layout) and Int8Linear prompts go through the same panels: the float product of the
    weights each layer holds (its dequantize()), within float rounding."""
    lin = torch.nn.Linear(320, 200, bias=False)
    layer = Int4Linear.from_linear(lin) if quantize_spec == "int4" else Int8Linear.from_linear(lin)
    x = torch.randn(64, 320)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", TYPES)
def test_embedding_rows_are_the_files_rows(qtype):
    lin, w = block_layer(qtype, n=50, k=64)
    emb = BlockEmbedding(lin.blocks, qtype.name, 64)
    tokens = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(tokens), w[tokens])


def test_operands_that_do_not_fit_are_refused():
    lin, _ = block_layer(Q.Q4_0)
    with pytest.raises(ValueError, match="Q4_1 blocks"):
        native.block_linear(torch.randn(1, 320), lin.blocks, "Q4_1")  # 18-byte blocks read as 20
    with pytest.raises(ValueError, match="bad operand"):
        BlockLinear(lin.blocks[:, :-2], "Q4_0", 320)
    with pytest.raises(IndexError):
        native.block_dequantize(lin.blocks, "Q4_0", 320, rows=torch.tensor([96]))


@pytest.mark.parametrize("qtype", TYPES)
def test_the_c_step_reads_the_blocks_as_the_layers_do(tmp_path, qtype, monkeypatch):
    """A packed model of blocks: its decode steps through one C call (step.NativeStep, which reads the same
    blocks) equal the layer-by-layer forward to 1e-3 of the largest logit (both round activations to int16
    per group; see test_native_step), with the same next token at every step."""
    from test_gguf_packed import TINY, write_tiny
    from test_native_step import steps

    from llama_min.runtime.packed import load_gguf_packed
    from llama_min.runtime.step import NativeStep
    from llama_min.runtime.transforms import apply_transforms

    counter = CallCounter(monkeypatch, "decode_layers")
    model = apply_transforms(load_gguf_packed(write_tiny(tmp_path / "m.gguf", qtype), "cpu", max_seq_len=64))
    tiled = native.vnni() and qtype.name in native.TILED_TYPES
    assert isinstance(model.layers[0].attention.wq, TiledLinear if tiled else BlockLinear)
    tokens = rand_tokens(1, 24, seed=5, vocab=TINY["vocab"])
    with torch.no_grad():
        got = steps(model, tokens, 8, NativeStep(model))
        assert counter.calls == 1 + 16
        want = steps(model, tokens, 8)
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.assets
def test_q8_0_perplexity_is_the_dequantized_models_on_the_default_model(tmp_path, smollm2_path):
    """Q8_0 held as stored (or tiled, with int8 activations where the CPU has AVX-512 VNNI): perplexity of the
    packed model equals the float model of the dequantized file within 0.1% (the default model written as
    Q8_0 by llama-min convert; the text: this project's README, 8 windows of 256 tokens)."""
    from llama_min import Llama
    from llama_min.checkpoint import convert
    from llama_min.decoding.perplexity import perplexity

    path = tmp_path / "smollm2-q8_0.gguf"
    convert(smollm2_path, path, to="gguf", gguf_type="q8_0")
    packed = Llama.build(path, max_seq_len=256)
    floats = Llama.build(path, max_seq_len=256, packed=False)
    assert isinstance(packed.model.layers[0].attention.wq, (BlockLinear, TiledLinear))
    tokens = packed.tokenizer.encode((ROOT / "README.md").read_text(), bos=False, eos=False)
    bos = packed.tokenizer.bos_id

    def ppl(llama):
        return perplexity(llama.model, tokens, n_ctx=256, bos_id=bos, max_windows=8, progress=False)["perplexity"]

    got, want = ppl(packed), ppl(floats)
    print(f"[q8_0] perplexity packed {got:.4f}, dequantized float {want:.4f} ({(got / want - 1) * 100:+.3f}%)")
    assert abs(got / want - 1) < 1e-3


@pytest.fixture
def vnni(monkeypatch):
    if not native.vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (the tiled layout is not used here)")


def k_quant_blocks(qtype, n, k, seed=0):
    """Random Q4_K or Q6_K rows (n, K/256 * block bytes): random codes and sub-block scales (and mins) under fp16
    d = 0.003 (Q4_K: dmin = 0.01), as gguf cannot quantize to these types, and the float32 weights the file
    means (gguf's dequantize)."""
    size, d_at = {Q.Q4_K: (144, 0), Q.Q6_K: (210, 208)}[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    raw[..., d_at:d_at + 2] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    if qtype == Q.Q4_K:
        raw[..., 2:4] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw = raw.reshape(n, -1)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, qtype).astype(np.float32))


def tiled_layer(qtype, n=61, k=320, seed=0):
    """A TiledLinear of random weights (61 rows: a last tile of 5), and the float32 weights the file means.
    (Q4_K, Q6_K: K = 512, two super-blocks.)"""
    if qtype in (Q.Q4_K, Q.Q6_K):
        k = 512
        blocks, w = k_quant_blocks(qtype, n, k, seed)
    else:
        lin, w = block_layer(qtype, n, k, seed)
        blocks = lin.blocks
    tiles = torch.empty(native.tiled_bytes(qtype.name, n, k), dtype=torch.uint8)
    return TiledLinear(native.tile_blocks(blocks, qtype.name, k, tiles), qtype.name, k, n), w


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K])
def test_tiles_hold_the_files_weights_exactly(qtype, vnni):
    lin, w = tiled_layer(qtype)
    if qtype == Q.Q4_K:  # 8 rows x 2 super-blocks: 1184 bytes each, the file's 1152 + 8 rows' 8 sc and 8 mn bytes
        assert lin.tiles.numel() == 8 * 2 * 1184
    elif qtype == Q.Q6_K:  # 8 tiles x 2 super-blocks x 8 rows of the file's 210 bytes
        assert lin.tiles.numel() == 8 * 2 * 8 * 210
    else:
        block = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype]
        assert lin.tiles.numel() == 64 * 10 * block  # the file's bytes, 3 rows repeated
    assert torch.equal(lin.dequantize(), w)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 21, 77])
def test_tiled_products_within_the_rounding_of_the_activations(qtype, rows, vnni):
    """Decoding and prompts alike: x written as two int8 digits per block of 32, x ~ s2 (254 x1 + x2) with
    s2 = max|x_g| / (127 * 254), integer sums exact, so |y - x W^T| <= sum_g (s2_g / 2) sum |W| over the group,
    plus float rounding; every row count exercises the kernel's passes of 16, 4 and 1 activation rows."""
    lin, w = tiled_layer(qtype)
    x = torch.randn(rows, w.shape[1])
    x[0, 7] = 40.0  # an outlier, as real activations have: its block's other values keep their precision
    got, want = lin(x), x @ w.t()
    err = (got - want).abs()
    assert torch.all(err <= int16_bound(x, w, levels=127 * 254)), err.max()
    assert err.max() > 0
