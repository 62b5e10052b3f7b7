"""int8 weight-only quantization: exact math on the quantized weights, bounded error, real-model agreement."""

import pytest
import torch
import torch.nn.functional as F

from llama_min.quantize import Int8Linear, quantize_int8, quantize_per_channel


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
    qlin = Int8Linear(lin)
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


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_int8_agrees_with_float32(smollm2, smollm2_path):
    from llama_min import Llama

    ref = smollm2
    q8 = Llama.build(smollm2_path, max_seq_len=128, max_batch_size=4, device="cpu", dtype=torch.float32,
                     quantize="int8")
    assert q8.weight_bytes_per_token() < 0.3 * ref.weight_bytes_per_token()
    prompts = ["Once upon a time, there was a little", "The capital of France is", "def fibonacci(n):",
               "The three primary colors are"]
    ids = [ref.tokenizer.encode(p) for p in prompts]
    with torch.no_grad():
        for row in ids:
            a, b = ref.model(torch.tensor([row])), q8.model(torch.tensor([row]))
            diff = (a - b).abs()
            print(f"[int8] max|dlogits| {diff.max():.2f}, mean {diff.mean():.3f} (logit scale {a.abs().max():.0f})")
            assert diff.mean() < 0.5 and diff.max() < 3.0
    out_ref, _ = ref.generate(ids, max_gen_len=24, temperature=0, stop_ids=set())
    out_q8, _ = q8.generate(ids, max_gen_len=24, temperature=0, stop_ids=set())
    agree = [next((k for k, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(out_ref, out_q8)]
    print(f"[int8] greedy tokens equal to float32 before the first difference: {agree}")
    assert min(agree) >= 3 and sum(agree) >= 40
    assert "Paris" in q8.tokenizer.decode(out_q8[1])
