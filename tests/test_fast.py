"""The CPU decode layout (wide layers stored transposed) computes the same numbers."""

import torch

from llama_min import ModelArgs, Transformer
from llama_min.fast import TransposedEmbedding, TransposedLinear, transpose_wide_layers


def model(**over):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=160,
                              max_seq_len=64, **over)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2) if p.ndim == 2 else p.copy_(1 + 0.1 * torch.randn_like(p))
    return m


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
