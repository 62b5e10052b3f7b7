"""GGUF checkpoints written here with the `gguf` package: every tensor type, rope_freqs, tied output, errors."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import quantize

from _ggml_blocks import DECODERS

from llama_min import ModelArgs, Transformer, load_checkpoint
from llama_min.checkpoint import build_transformer
from llama_min.model import rope_frequencies

ARGS = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=256, norm_eps=1e-5,
            rope_theta=500000.0)
GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
BLOCK_BYTES = {Q.Q4_K: (256, 144, [(0, 2), (2, 4)]), Q.Q6_K: (256, 210, [(208, 210)])}  # fp16 scale fields


def gguf_name(meta_name: str) -> str:
    parts = meta_name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:-1])]}.weight"
    return f"{GGUF_NAMES[parts[0]]}.weight"


def encode(w: np.ndarray, qtype, rng):
    """Bytes of w in qtype; K-quants (which the gguf package cannot quantize) get random valid blocks."""
    if qtype in BLOCK_BYTES:
        block, size, scale_fields = BLOCK_BYTES[qtype]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for a, b in scale_fields:
            raw[..., a:b] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        return raw.reshape(w.shape[0], -1)
    return quantize(w, qtype)


def write_gguf(path, sd, types, tied=False, rope_freqs=None):
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.embedding_length", ARGS["dim"])
    w.add_uint32("llama.block_count", ARGS["n_layers"])
    w.add_uint32("llama.feed_forward_length", ARGS["hidden_dim"])
    w.add_uint32("llama.attention.head_count", ARGS["n_heads"])
    w.add_uint32("llama.attention.head_count_kv", ARGS["n_kv_heads"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", ARGS["norm_eps"])
    w.add_float32("llama.rope.freq_base", ARGS["rope_theta"])
    w.add_uint32("llama.context_length", 512)
    w.add_uint32("llama.vocab_size", ARGS["vocab_size"])
    rng = np.random.default_rng(0)
    for i, (name, t) in enumerate(sd.items()):
        if tied and name == "output.weight":
            continue
        arr = t.detach().float().numpy()
        qtype = Q.F32 if arr.ndim == 1 else types[i % len(types)]
        data = encode(arr, qtype, rng)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32), raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0, 0.05)
    return model


def test_float_gguf_equals_source_model(tiny, tmp_path):
    path = write_gguf(tmp_path / "f32.gguf", tiny.state_dict(), [Q.F32])
    args, sd = load_checkpoint(path)
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.ffn_hidden, args.vocab_size) == (256, 2, 4, 2, 256, 96)
    tokens = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert torch.equal(build_transformer(args, sd)(tokens), tiny(tokens))


@pytest.mark.parametrize("types", [[Q.F16, Q.BF16, Q.Q8_0], [Q.Q4_0, Q.Q4_1, Q.Q5_0], [Q.Q4_K, Q.Q6_K]],
                         ids=["f16-bf16-q8_0", "q4_0-q4_1-q5_0", "q4_k-q6_k"])
def test_every_tensor_type_dequantizes_like_the_block_layouts(tiny, tmp_path, types):
    """Loaded values equal a hand decoding of each tensor's raw blocks (tests/_ggml_blocks.py, written from
    the published layouts), and are close to the float weights that were quantized."""
    path = write_gguf(tmp_path / "q.gguf", tiny.state_dict(), types)
    _, sd = load_checkpoint(path)
    seen = set()
    for t in GGUFReader(str(path)).tensors:
        name = {gguf_name(k): k for k in sd}[t.name]
        shape = tuple(int(s) for s in reversed(t.shape))
        if t.tensor_type in (Q.F32, Q.F16):
            want = np.asarray(t.data, dtype=np.float32).reshape(shape)
        elif t.tensor_type == Q.BF16:  # the top 16 bits of a float32
            want = (np.asarray(t.data).reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            decode = DECODERS[t.tensor_type.name]
            want = np.stack([decode(row) for row in np.asarray(t.data).reshape(shape[0], -1)])
        assert torch.equal(sd[name], torch.from_numpy(np.array(want, np.float32).reshape(shape))), t.name
        if t.tensor_type not in BLOCK_BYTES:  # (K-quant blocks are random bytes, not a quantized weight)
            step = {Q.Q4_0: 0.2, Q.Q4_1: 0.1, Q.Q5_0: 0.1}.get(t.tensor_type, 0.02)  # of the row's max |w|
            orig = tiny.state_dict()[name]
            assert (sd[name] - orig).abs().max() <= step * orig.abs().max(), t.name
        seen.add(t.tensor_type)
    assert set(types) <= seen


def test_quantized_gguf_runs_close_to_float(tiny, tmp_path):
    path = write_gguf(tmp_path / "q8.gguf", tiny.state_dict(), [Q.Q8_0])
    args, sd = load_checkpoint(path, dtype=torch.bfloat16)
    assert sd["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    tokens = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert (build_transformer(args, sd)(tokens) - tiny(tokens)).abs().max() < 0.1  # logits ~2: Q8_0 + bf16 rounding


def test_tied_output_and_rope_freqs(tiny, tmp_path):
    divisors = np.linspace(1.0, 8.0, 32)
    path = write_gguf(tmp_path / "tied.gguf", tiny.state_dict(), [Q.F32], tied=True, rope_freqs=divisors)
    args, sd = load_checkpoint(path)
    assert args.tie_word_embeddings and sd["output.weight"] is sd["tok_embeddings.weight"]
    base = rope_frequencies(ModelArgs(**ARGS))
    torch.testing.assert_close(rope_frequencies(args), base / torch.tensor(divisors, dtype=torch.float32))


def test_truncated_gguf_is_a_clear_error(tiny, tmp_path):
    path = write_gguf(tmp_path / "full.gguf", tiny.state_dict(), [Q.Q8_0])
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match="cut.gguf: tensor '.*': .*truncated"):
        load_checkpoint(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_checkpoint(cut)


def test_ggml_type_table_matches_the_gguf_package():
    """llama_min.files.gguf keeps its own (name, block, bytes) table so a load does not import gguf (~0.1 s):
    each entry equals the gguf package's, and the types llama_min reads are all there."""
    from gguf.constants import GGML_QUANT_SIZES

    from llama_min.files.gguf import GGML_TYPES

    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        assert Q(type_id).name == name and GGML_QUANT_SIZES[Q(type_id)] == (block, nbytes), type_id
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"} <= {n for n, _, _ in GGML_TYPES.values()}

