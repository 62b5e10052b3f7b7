"""Quantized GGUF files run packed: the file's own values, logits against the float path, memory at scale.

Files are written here with the `gguf` package (GGUFWriter); `gguf.quants.dequantize` is the independent
reference for what each block means. The gguf package cannot quantize K-quants, so those tensors are
random valid blocks (random bytes with the fp16 scale fields set to sizes that give weights ~0.1).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from conftest import use_int4_kernel
from llama_min import load_checkpoint
from llama_min.checkpoint import build_transformer
from llama_min.runtime.packed import GGUFTensor, is_quantized_gguf, load_gguf_packed, packed_linear
from llama_min.runtime import native
from llama_min.runtime.blocks import BlockEmbedding, BlockLinear, TiledLinear
from llama_min.runtime.quantize import Int4Embedding, Int4Linear, Int4RowsEmbedding, Int8Embedding, Int8Linear

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden=512, vocab=128)

# fp16 scale fields of random K-quant (and IQ4_NL) blocks: (byte offset, value); sizes give |w| ~ 0.1
SCALE_FIELDS = {
    Q.Q4_K: [(0, 3e-4), (2, 2e-3)],  # w = d*sc*q - dmin*m, sc, m 6-bit, q 0..15
    Q.Q5_K: [(0, 1.5e-4), (2, 2e-3)],  # q 0..31
    Q.Q6_K: [(208, 2e-5)],  # w = d*sc*(q-32), sc int8
    Q.Q2_K: [(80, 1e-2), (82, 3e-3)],  # w = d*(sc&15)*q - dmin*(sc>>4), q 0..3
    Q.Q3_K: [(108, 3e-3)],  # w = d*(sc-32)*q, q -4..3
    Q.IQ4_NL: [(0, 1e-3)],  # w = d*table[q], |table| <= 127
}


def encode(w: np.ndarray, qtype, rng) -> np.ndarray:
    """(N, K) float -> (N, row bytes) uint8 in qtype (random valid blocks for what gguf cannot quantize)."""
    if qtype not in SCALE_FIELDS:
        return quantize(w, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for offset, value in SCALE_FIELDS[qtype]:
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw.reshape(w.shape[0], -1)


def tiny_tensors(seed=0):
    """GGUF name -> float32 array for a tiny Llama (shapes in row-major (out, in) order)."""
    c, rng = TINY, np.random.default_rng(seed)
    hd = c["dim"] // c["n_heads"]
    shapes = {"token_embd.weight": (c["vocab"], c["dim"]), "output_norm.weight": (c["dim"],),
              "output.weight": (c["vocab"], c["dim"])}
    d, kv, f = c["dim"], c["n_kv_heads"] * hd, c["hidden"]
    for i in range(c["n_layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv, d),
                       f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                       f"blk.{i}.ffn_down.weight": (d, f)})
    return {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.1 * rng.standard_normal(s)).astype(np.float32)
            for n, s in shapes.items()}


def add_llama_metadata(w: GGUFWriter, dim, n_layers, n_heads, n_kv_heads, hidden, vocab):
    w.add_uint32("llama.embedding_length", dim)
    w.add_uint32("llama.block_count", n_layers)
    w.add_uint32("llama.feed_forward_length", hidden)
    w.add_uint32("llama.attention.head_count", n_heads)
    w.add_uint32("llama.attention.head_count_kv", n_kv_heads)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_uint32("llama.context_length", 512)
    w.add_uint32("llama.vocab_size", vocab)


def write_tiny(path: Path, qtype, tied=False, embd_type=None, seed=0) -> Path:
    """A tiny model with every matrix in qtype (token_embd in embd_type), norms F32."""
    w, rng = GGUFWriter(str(path), "llama"), np.random.default_rng(seed + 1)
    add_llama_metadata(w, **TINY)
    for name, arr in tiny_tensors(seed).items():
        if tied and name == "output.weight":
            continue
        t = Q.F32 if arr.ndim == 1 else (embd_type or qtype) if name == "token_embd.weight" else qtype
        w.add_tensor(name, encode(arr, t, rng) if t != Q.F32 else arr, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def float_model(path):
    args, sd = load_checkpoint(path, dtype=torch.float32)
    return build_transformer(args, sd).eval()


def one_tensor(tmp_path, qtype, arr, rng=None):
    """Write one (N, K) matrix as the model's only tensor; return (GGUFTensor, mmap, gguf reference float)."""
    import mmap

    from llama_min.files.gguf import read_gguf_tensor_infos

    raw = encode(arr, qtype, rng or np.random.default_rng(0))
    path = tmp_path / "one.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, infos = read_gguf_tensor_infos(path)
    f = open(path, "rb")
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # as the loader maps files
    return GGUFTensor(buf, *infos[0]), raw, torch.from_numpy(dequantize(raw, qtype).astype(np.float32))


def fp16_field(raw: np.ndarray, block_bytes: int, offset: int) -> np.ndarray:
    """The fp16 field at `offset` of every block of a (N, row bytes) array -> (N, blocks) float32."""
    b = raw.reshape(raw.shape[0], -1, block_bytes)[..., offset : offset + 2]
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def packed_q4(tmp_path, qtype, monkeypatch, kernel):
    """A random 64 x 256 tensor written as `qtype`, loaded packed for `kernel`: (layer, file bytes, file values)."""
    use_int4_kernel(monkeypatch, kernel)
    arr = (0.1 * np.random.default_rng(1).standard_normal((64, 256)) + 0.02).astype(np.float32)
    t, raw, ref = one_tensor(tmp_path, qtype, arr)
    lin = packed_linear(t, "cpu", torch.float32)
    if kernel == "avx2":
        assert isinstance(lin, BlockLinear) and lin.ggml_type == qtype.name
    else:
        assert isinstance(lin, Int4Linear) and lin.group_size == 32 and lin.layout == "cpu"
    return lin, raw, ref


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_blocks_are_the_files_values_exactly_and_held_where_the_file_is_mapped(tmp_path, qtype, monkeypatch):
    """Q4_0 / Q4_1 / Q8_0 on the AVX2 kernels: the layer reads the file's blocks in place (a view of the mapping,
    not a copy) and its weights are the file's, bit for bit (gguf.quants.dequantize is the reference)."""
    use_int4_kernel(monkeypatch, "avx2")
    monkeypatch.setenv("LLAMA_MIN_VNNI", "0")  # (with AVX-512 VNNI, Q4_0 / Q4_1 load tiled: test_blocks.py)
    arr = (0.1 * np.random.default_rng(1).standard_normal((64, 256)) + 0.02).astype(np.float32)
    t, raw, ref = one_tensor(tmp_path, qtype, arr)
    lin = packed_linear(t, "cpu", torch.float32)
    assert isinstance(lin, BlockLinear) and lin.ggml_type == qtype.name
    assert torch.equal(lin.dequantize(), ref)
    assert np.array_equal(lin.blocks.numpy(), raw)
    start = np.frombuffer(t.buf, np.uint8, 1, t.offset).__array_interface__["data"][0]
    assert lin.blocks.data_ptr() == start  # the mapped file's own bytes
    rows = torch.tensor([5, 0, 63, 5])
    assert torch.equal(native.block_dequantize(lin.blocks, qtype.name, 256, rows=rows), ref[rows])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_0_q4_1_hold_the_files_values(tmp_path, qtype, monkeypatch):
    lin, raw, ref = packed_q4(tmp_path, qtype, monkeypatch, "torch")
    got = lin.dequantize()
    # The only change allowed: scale d and zero (Q4_0: 0; Q4_1: m + 8d) rounded to bf16, relative error
    # <= 2^-8 each, so |dw| <= |q - 8| |d| 2^-8 + |zero| 2^-8 <= (8|d| + |m + 8d|) 2^-8 per block of 32.
    d = fp16_field(raw, GGML_QUANT_SIZES[qtype][1], 0)
    m = fp16_field(raw, 20, 2) if qtype == Q.Q4_1 else np.zeros_like(d)
    tol = torch.from_numpy((8 * np.abs(d) + np.abs(m + 8 * d)) * 2.0**-8).repeat_interleave(32, dim=1)
    assert torch.all((got - ref).abs() <= tol + 1e-9)
    assert (got - ref).abs().max() > 0 or qtype == Q.Q4_0  # Q4_1's zeros really are rounded: the bound is tight


def test_q4_0_with_bf16_exact_scales_is_bit_identical(tmp_path, monkeypatch):
    """Q4_0 with every d a power of two (exact in bf16): the packed weights are the file's, bit for bit."""
    use_int4_kernel(monkeypatch, "torch")
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (32, 256 // 32, 18), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(2.0**-7).tobytes(), np.uint8)
    path = tmp_path / "exact.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw.reshape(32, -1), raw_dtype=Q.Q4_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    import mmap

    from llama_min.files.gguf import read_gguf_tensor_infos

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        lin = packed_linear(GGUFTensor(buf, *read_gguf_tensor_infos(path)[1][0]), "cpu", torch.float32)
        assert torch.equal(lin.dequantize(), torch.from_numpy(dequantize(raw.reshape(32, -1), Q.Q4_0)))


@pytest.mark.parametrize("kernel", ["tiled", "avx2", "torch"])
def test_q4_k_values_within_rounding_of_the_sub_block_scales(tmp_path, kernel, monkeypatch):
    use_int4_kernel(monkeypatch, "torch" if kernel == "torch" else "avx2")
    if kernel == "tiled" and not native.vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (Q4_K is not tiled here)")
    monkeypatch.setenv("LLAMA_MIN_VNNI", "1" if kernel == "tiled" else "0")
    arr = np.zeros((32, 512), np.float32)
    t, raw, ref = one_tensor(tmp_path, Q.Q4_K, arr, np.random.default_rng(3))
    lin = packed_linear(t, "cpu", torch.float32)
    if kernel == "tiled":  # in Q4_K's own tiles: the file's weights exactly
        assert isinstance(lin, TiledLinear) and lin.ggml_type == "Q4_K"
        assert torch.equal(lin.dequantize(), ref)
        return
    else:
        assert isinstance(lin, Int4Linear) and lin.layout == ("avx2" if kernel == "avx2" else "cpu")
    d, dmin = fp16_field(raw, 144, 0), fp16_field(raw, 144, 2)
    if kernel == "avx2":  # scale s = d*sc <= 63 d and min = -dmin*mn rounded to fp16 (2^-11): |dw| <= (15*63 d + 63 dmin) 2^-11
        tol = torch.from_numpy((15 * 63 * d + 63 * dmin) * 2.0**-11).repeat_interleave(256, dim=1)
    else:  # scale s and zero = 8 s - dmin*mn rounded to bf16: |dw| <= (8*63 d + 8*63 d + 63 dmin) 2^-8
        tol = torch.from_numpy((16 * 63 * d + 63 * dmin) * 2.0**-8).repeat_interleave(256, dim=1)
    err = (lin.dequantize() - ref).abs()
    assert torch.all(err <= tol * (1 + 1e-6)) and ref.abs().max() > 100 * tol.max()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K])
def test_8bit_types_requantized_per_row_within_half_a_step(tmp_path, qtype, monkeypatch):
    if qtype == Q.Q8_0:  # held as stored where the AVX2 kernels run: requantized only for PyTorch's kernels
        use_int4_kernel(monkeypatch, "torch")
    monkeypatch.setenv("LLAMA_MIN_VNNI", "0")  # (with AVX-512 VNNI, Q6_K is tiled as Q8_0: the test below)
    arr = (0.1 * np.random.default_rng(4).standard_normal((48, 256))).astype(np.float32)
    t, _, ref = one_tensor(tmp_path, qtype, arr, np.random.default_rng(5))
    lin = packed_linear(t, "cpu", torch.float32)
    assert isinstance(lin, Int8Linear)
    step = ref.abs().amax(dim=1, keepdim=True) / 127  # int8 per-row grid of the file's own values
    assert torch.all((lin.dequantize() - ref).abs() <= step / 2 * (1 + 1e-5))


def test_q6_k_tiled_holds_the_files_weights_exactly(tmp_path, monkeypatch):
    """With AVX-512 VNNI a Q6_K matrix is tiled as it is (native.q6kx8_repack): the file's weights bit for bit, in
    the file's number of bytes."""
    use_int4_kernel(monkeypatch, "avx2")
    if not native.vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (Q6_K is not tiled here)")
    t, _, ref = one_tensor(tmp_path, Q.Q6_K, np.zeros((40, 512), np.float32), np.random.default_rng(11))
    lin = packed_linear(t, "cpu", torch.float32)
    assert isinstance(lin, TiledLinear) and lin.ggml_type == "Q6_K"
    assert lin.tiles.numel() == 40 * 2 * 210
    assert torch.equal(lin.dequantize(), ref)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quants_converted_in_c_as_in_python(tmp_path, qtype, monkeypatch):
    """Q4_K and Q6_K are converted at load by kernels_avx2.c: the same layers the Python route builds from the
    gguf package's float weights. Q6_K: int8 per row of those weights (quantize_per_channel), codes equal
    except where the product d*sc*q rounds differently in its last bit (a code off by one at a tie); Q4_K: the
    file's codes, scale d*sc and min -dmin*mn rounded to fp16 (checked against the file's values above)."""
    from llama_min.runtime.quantize import quantize_per_channel

    use_int4_kernel(monkeypatch, "avx2")
    monkeypatch.setenv("LLAMA_MIN_VNNI", "0")  # the 'avx2' layout (tiled Q4_K: the test above)
    t, raw, ref = one_tensor(tmp_path, qtype, np.zeros((40, 512), np.float32), np.random.default_rng(11))
    lin = packed_linear(t, "cpu", torch.float32)
    if qtype == Q.Q6_K:
        q, scales = quantize_per_channel(ref)
        assert isinstance(lin, Int8Linear) and torch.allclose(lin.scales, scales, rtol=1e-6, atol=0)
        off = (lin.weight.int() - q.int()).abs()
        assert off.max() <= 1 and (off > 0).float().mean() < 1e-3
    else:
        assert isinstance(lin, Int4Linear) and lin.layout == "avx2"
        qs = raw.reshape(40, -1, 144)[..., 16:].reshape(40, -1, 4, 1, 32)  # (rows, super-block, chunk, 1, 32)
        want = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(40, 512)  # sub-block 2c: low, 2c+1: high
        w = lin.weight.numpy().reshape(40, 16, 16)  # 'avx2' group: byte i = weight i | weight i+16 << 4
        got = np.concatenate([w & 15, w >> 4], axis=-1).reshape(40, 512)
        assert np.array_equal(got, want)


TYPES = [(Q.Q4_0, False, None), (Q.Q4_1, True, Q.Q8_0), (Q.Q4_K, False, Q.Q6_K), (Q.Q8_0, True, None),
         (Q.Q5_0, False, None), (Q.Q5_K, False, Q.Q4_K), (Q.Q6_K, True, None), (Q.Q2_K, False, None),
         (Q.Q3_K, False, Q.Q4_1)]


KERNELS = [(*t, "avx2") for t in TYPES] + [(q, t, e, "torch") for q, t, e in TYPES
                                           if q in (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0)]
AS_STORED = (Q.Q4_0, Q.Q4_1, Q.Q8_0)  # held as the file's blocks where the AVX2 kernels run (BlockLinear)


@pytest.mark.parametrize("qtype,tied,embd,kernel", KERNELS,
                         ids=[f"{q.name}{'-tied' if t else ''}-{k}" for q, t, _, k in KERNELS])
def test_packed_logits_agree_with_the_float_path(tmp_path, qtype, tied, embd, kernel, monkeypatch):
    use_int4_kernel(monkeypatch, kernel)
    path = write_tiny(tmp_path / "m.gguf", qtype, tied=tied, embd_type=embd)
    assert is_quantized_gguf(path)
    ref, packed = float_model(path), load_gguf_packed(path, "cpu")
    kinds = {type(m) for m in packed.modules()}
    blocks = kernel == "avx2" and (qtype in AS_STORED or (qtype in (Q.Q4_K, Q.Q6_K) and native.vnni()))  # tiled
    assert bool({BlockLinear, TiledLinear} & kinds) == blocks and torch.nn.Linear not in kinds
    assert (Int4Linear in kinds) == (qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) and not blocks)
    embd_blocks = kernel == "avx2" and (embd or qtype) in AS_STORED
    embeddings = (BlockEmbedding,) if embd_blocks else (Int4Embedding, Int4RowsEmbedding, Int8Embedding)
    assert type(packed.tok_embeddings) in embeddings
    if tied and embd_blocks:  # the output layer reads the embedding's own blocks: one copy of the table
        assert packed.output.blocks.data_ptr() == packed.tok_embeddings.blocks.data_ptr()
    tokens = torch.randint(0, TINY["vocab"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(tokens), packed(tokens)
    # Per weight, 4-bit types change only by the bf16 rounding of scale and zero (<= 2^-8 relative); PyTorch's
    # kernels also round activations and outputs to bf16 (2^-8). (The 'avx2' kernel changes much less:
    # fp16 scales, exact for Q4_0/Q4_1, and int16 activations, 1.5e-5 of each group's largest.) 8-bit types add the per-row requantization
    # (<= 1/254 of the row's largest weight, ~1.5% of a typical one). This random model (weights ~N(0, 0.1),
    # gain ~1.6 per matrix) amplifies such changes ~5x: rounding only the activations to bf16 already moves
    # its logits by 1.3% of their largest. Hence: mean |dlogits| <= 4% (4-bit) / 8% (8-bit) of mean |logits|,
    # max <= 10% / 15% of max |logits|. A layout bug (nibble or sub-block order, sign of the zero) changes
    # weights by ~100% and moves logits by about their own size.
    four = qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) and embd in (None, Q.Q4_K, Q.Q4_1)
    mean_err, max_err = ((a - b).abs().mean() / a.abs().mean()).item(), ((a - b).abs().max() / a.abs().max()).item()
    print(f"[{qtype.name}] relative |dlogits|: mean {mean_err:.4f}, max {max_err:.4f}")
    assert mean_err <= (0.04 if four else 0.08) and max_err <= (0.10 if four else 0.15)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_unsupported_type_falls_back_to_float_with_one_warning(tmp_path, capsys):
    path = write_tiny(tmp_path / "iq.gguf", Q.Q4_0)
    # rewrite with one IQ4_NL tensor (a non-linear 4-bit table the packed path does not support)
    w, rng = GGUFWriter(str(tmp_path / "iq2.gguf"), "llama"), np.random.default_rng(7)
    add_llama_metadata(w, **TINY)
    for name, arr in tiny_tensors().items():
        t = Q.F32 if arr.ndim == 1 else Q.IQ4_NL if name == "blk.1.ffn_up.weight" else Q.Q4_0
        w.add_tensor(name, encode(arr, t, rng) if t != Q.F32 else arr, raw_dtype=t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    path = tmp_path / "iq2.gguf"
    capsys.readouterr()
    packed = load_gguf_packed(path, "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blk.1.ffn_up.weight" in err[0] and "IQ4_NL" in err[0] and err[0].startswith("warning:")
    assert type(packed.layers[1].feed_forward.w3) is torch.nn.Linear
    ref = float_model(path)
    torch.testing.assert_close(packed.layers[1].feed_forward.w3.weight, ref.layers[1].feed_forward.w3.weight)


def test_bad_files_raise_llama_min_errors(tmp_path):
    from llama_min.errors import LlamaMinError

    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(LlamaMinError, match="past the end"):
        load_gguf_packed(cut)


@pytest.mark.assets
def test_smollm2_runs_packed_by_default(smollm2_path):
    from llama_min import Llama

    from llama_min.runtime import native

    llama = Llama.build(smollm2_path, max_seq_len=128, max_batch_size=1, device="cpu")
    if native.enabled():  # the file's Q4_1 blocks (tiled with AVX-512 VNNI) and its Q8_0 token_embd, mapped
        assert isinstance(llama.model.layers[0].attention.wq, TiledLinear if native.vnni() else BlockLinear)
        assert isinstance(llama.model.output, BlockLinear) and llama.model.output.ggml_type == "Q8_0"
    else:  # repacked for PyTorch's kernels, q/k/v stacked
        assert isinstance(llama.model.layers[0].attention.wqkv, Int4Linear)
        assert isinstance(llama.model.output, Int8Linear)  # tied to token_embd, stored Q8_0
    tok = llama.tokenizer
    out, _ = llama.generate([tok.encode("The capital of France is", bos=tok.add_bos, eos=False)],
                            max_gen_len=8, temperature=0)
    print(f"[packed] {tok.decode(out[0])!r}")
    assert "Paris" in tok.decode(out[0])
    floats = Llama.build(smollm2_path, max_seq_len=128, max_batch_size=1, device="cpu", packed=False)
    assert not any(isinstance(m, (Int4Linear, Int8Linear, BlockLinear, TiledLinear)) for m in floats.model.modules())


# ---------------------------------------------------------------------------------------------
# Memory at scale: a ~1B-shape Q4_0 file, loaded packed and generating in a fresh process
# ---------------------------------------------------------------------------------------------

LLAMA_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden=8192, vocab=128256)


def write_random_q4_0(path: Path, dim, n_layers, n_heads, n_kv_heads, hidden, vocab, tied=False) -> int:
    """A random-weight Q4_0 Llama file written tensor by tensor (never the whole model in memory)."""
    hd = dim // n_heads
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (vocab, dim)
    for i in range(n_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.ffn_norm.weight": (dim,),
                       f"blk.{i}.attn_q.weight": (dim, dim), f"blk.{i}.attn_k.weight": (n_kv_heads * hd, dim),
                       f"blk.{i}.attn_v.weight": (n_kv_heads * hd, dim), f"blk.{i}.attn_output.weight": (dim, dim),
                       f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_up.weight": (hidden, dim),
                       f"blk.{i}.ffn_down.weight": (dim, hidden)})
    w = GGUFWriter(str(path), "llama")
    add_llama_metadata(w, dim, n_layers, n_heads, n_kv_heads, hidden, vocab)
    for name, s in shapes.items():
        if len(s) == 1:
            w.add_tensor_info(name, s, np.dtype(np.float32), s[0] * 4)
        else:
            w.add_tensor_info(name, (s[0], s[1] // 32 * 18), np.dtype(np.uint8), s[0] * s[1] // 32 * 18, Q.Q4_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for name, s in shapes.items():
        if len(s) == 1:
            w.write_tensor_data(np.ones(s, np.float32))
            continue
        raw = rng.integers(0, 256, (s[0], s[1] // 32, 18), dtype=np.uint8)
        raw[..., 0:2] = scale
        w.write_tensor_data(raw.reshape(s[0], -1))
        del raw
    w.close()
    return path.stat().st_size


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch, llama_min

    def rss(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    base = rss("VmRSS:")  # the import baseline: python -c "import torch, llama_min"
    from llama_min import Llama
    from llama_min.runtime.memory import kv_cache_bytes
    from llama_min.runtime.packed import load_gguf_packed
    from llama_min.runtime.transforms import apply_transforms

    path, prompt_len = sys.argv[1], int(sys.argv[2])
    window = prompt_len + 32
    model = apply_transforms(load_gguf_packed(path, "cpu", max_seq_len=window))  # as Llama.build, no tokenizer
    prompt = torch.randint(3, 100, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    out, _ = Llama(model, None, window, 1).generate([prompt], max_gen_len=32, temperature=0, stop_ids=set())
    p = model.params
    kv = kv_cache_bytes(p.n_layers, p.kv_heads, p.hd, 1, window, 4)
    print(json.dumps({"peak": rss("VmHWM:"), "base": base, "kv": kv, "tokens": len(out[0])}))
""")


def peak_rss_of_packed_run(path: Path, prompt_len: int) -> dict:
    """Peak RSS (VmHWM) of a fresh process that builds the packed model of `path` and generates 32 tokens after a
    prompt of prompt_len tokens, with the import baseline and the KV cache's bytes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), str(prompt_len)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["tokens"] == 32
    return r


def report(name: str, size: int, r: dict) -> float:
    added = r["peak"] - r["base"] - r["kv"]
    print(f"[rss {name}] file {size / 2**20:.1f} MiB, peak RSS {r['peak'] / 2**20:.1f} MiB, import baseline "
          f"{r['base'] / 2**20:.1f} MiB, KV cache {r['kv'] / 2**20:.1f} MiB: the rest {added / 2**20:.1f} MiB = "
          f"{added / size:.2f}x the file")
    return added


@pytest.mark.slow
def test_1b_shape_q4_0_runs_a_512_token_prompt_within_1_15x_the_file(tmp_path):
    """Peak RSS of build + a 512-token prompt + 32 tokens <= the import baseline + the KV cache + 1.15x the file
    (the weights are the file's bytes, tiled or mapped, and their file pages are not held twice)."""
    size = write_random_q4_0(tmp_path / "1b.gguf", **dict(LLAMA_1B, n_layers=8))  # 8 of 16 layers: time
    assert report("1B-shape Q4_0, 8 layers", size, peak_rss_of_packed_run(tmp_path / "1b.gguf", 512)) <= 1.15 * size


@pytest.mark.assets
def test_smollm2_q4_1_runs_a_512_token_prompt_near_the_files_size(smollm2_path):
    """The default model's 94 MiB file: weights at the file's size, plus costs the file size does not scale:
    torch's and gguf's modules loaded on first use (~15 MiB) and a 512-row prompt's activations (~30 MiB:
    SmolLM2's FFN is 1536 wide). Measured 2026-12-07: the rest over the baseline and KV cache 132 MiB =
    1.40x the file (llama.cpp's whole process: 126 MiB). The bound: 1.15x the file + those 48 MiB."""
    size = smollm2_path.stat().st_size
    added = report("SmolLM2 Q4_1", size, peak_rss_of_packed_run(smollm2_path, 512))
    assert added <= 1.15 * size + 48 * 2**20


def test_loading_a_quantized_gguf_does_not_import_the_gguf_package(tmp_path):
    """A fresh process builds a packed Q4_0 model (F32 norms included) and runs it without importing gguf,
    nor the yaml and sentencepiece that gguf's own import pulls in (~0.1 s of a small model's start)."""
    write_random_q4_0(tmp_path / "m.gguf", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, vocab=96)
    script = ("import sys; from llama_min.runtime.packed import load_gguf_packed; "
              "m = load_gguf_packed(sys.argv[1], 'cpu', max_seq_len=16); import torch; m(torch.tensor([[1, 2]]), 0); "
              "print(sorted(n for n in ('gguf', 'yaml', 'sentencepiece') if n in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.gguf")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "[]"
