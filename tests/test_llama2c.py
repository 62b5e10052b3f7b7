"""llama2.c checkpoints (.pt, .bin v0/v1/v2) and tokenizer.bin, written here following llama2.c's published
layout, against the same weights loaded as a Meta folder."""

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny import write_meta_checkpoint
from llama_min import load_checkpoint, load_tokenizer
from llama_min.checkpoint import build_transformer
from llama_min.errors import LlamaMinError

ROOT = Path(__file__).resolve().parent.parent
MODEL_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=32,
                  dropout=0.0)
LAYER_KINDS = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def llama2c_state_dict(seed=0, tied=True):
    """Random weights with llama2.c's shapes: hd 16, F = 192 (int(2*4*64/3) rounded up to 32), tied output."""
    g = torch.Generator().manual_seed(seed)
    d, F, hd = 64, 192, 16
    shapes = {"tok_embeddings.weight": (96, d), "norm.weight": (d,)}
    for i in range(2):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                       p + "attention.wq.weight": (4 * hd, d), p + "attention.wk.weight": (2 * hd, d),
                       p + "attention.wv.weight": (2 * hd, d), p + "attention.wo.weight": (d, 4 * hd),
                       p + "feed_forward.w1.weight": (F, d), p + "feed_forward.w2.weight": (d, F),
                       p + "feed_forward.w3.weight": (F, d)})
    sd = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
          for k, s in shapes.items()}
    sd["output.weight"] = sd["tok_embeddings.weight"] if tied else 0.1 * torch.randn(96, d, generator=g)
    return sd


def meta_folder(path, sd):
    params = {k: MODEL_ARGS[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")}
    return write_meta_checkpoint(path, dict(params, norm_eps=1e-5), sd)


def per_layer(sd, kind):
    return [sd[f"layers.{i}.{kind}.weight"] for i in range(2)]


def f32(t):
    return t.detach().float().contiguous().numpy().astype("<f4").tobytes()


def write_v0(path, sd, tied=True):
    vocab = 96 if tied else -96
    out = [struct.pack("<7i", 64, 192, 2, 4, 2, vocab, 32), f32(sd["tok_embeddings.weight"])]
    for kind in LAYER_KINDS:
        out += [f32(t) for t in per_layer(sd, kind)]
    out += [f32(sd["norm.weight"]), f32(torch.rand(32, 8)), f32(torch.rand(32, 8))]  # norm, freqs_cos, freqs_sin
    if not tied:
        out.append(f32(sd["output.weight"]))
    path.write_bytes(b"".join(out))
    return path


def v1_header(version, tied, extra=b""):
    head = struct.pack("<Ii7iB", 0x616B3432, version, 64, 192, 2, 4, 2, 96, 32, int(tied)) + extra
    return head + b"\0" * (256 - len(head))


MATRIX_KINDS = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3"]


def write_v1(path, sd, tied=True):
    out = [v1_header(1, tied)] + [f32(t) for t in per_layer(sd, "attention_norm") + per_layer(sd, "ffn_norm")]
    out += [f32(sd["norm.weight"]), f32(sd["tok_embeddings.weight"])]
    for kind in MATRIX_KINDS:
        out += [f32(t) for t in per_layer(sd, kind)]
    if not tied:
        out.append(f32(sd["output.weight"]))
    path.write_bytes(b"".join(out))
    return path


def write_v2(path, sd, group=32):
    """Version 2 (tied): norms float32, matrices int8 (round(w / (max|w| / 127)) per group), then the scales."""
    norms = per_layer(sd, "attention_norm") + per_layer(sd, "ffn_norm") + [sd["norm.weight"]]
    mats = [sd["tok_embeddings.weight"]] + [t for kind in MATRIX_KINDS for t in per_layer(sd, kind)]
    qs, scales, deq = [], [], []
    for w in mats:
        g = w.reshape(-1, group)
        s = g.abs().max(dim=1).values / 127.0
        q = torch.round(g / s[:, None]).to(torch.int8)
        qs.append(q.numpy().tobytes())
        scales.append(f32(s))
        deq.append((q.float() * s[:, None]).view(w.shape))
    path.write_bytes(v1_header(2, True, struct.pack("<i", group)) + b"".join(map(f32, norms)) + b"".join(qs)
                     + b"".join(scales))
    return deq


def write_pt(path, sd, compiled=False):
    """train.py's checkpoint: model, model_args, optimizer state, iter_num, best_val_loss, config."""
    model = {("_orig_mod." if compiled else "") + k: v for k, v in sd.items()}
    params = [torch.nn.Parameter(v.clone()) for v in list(sd.values())[:3]]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    torch.save({"model": model, "model_args": MODEL_ARGS, "optimizer": opt.state_dict(), "iter_num": 100,
                "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 8, "dataset": "tinystories",
                                                               "learning_rate": 5e-4, "compile": compiled}}, path)
    return path


def logits(path):
    args, sd = load_checkpoint(path)
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return build_transformer(args, sd).eval()(tokens)


@pytest.mark.parametrize("kind", ["pt", "pt-compiled", "v0", "v0-untied", "v1", "v1-untied"])
def test_llama2c_matches_meta_folder(tmp_path, kind):
    tied = not kind.endswith("untied")
    sd = llama2c_state_dict(tied=tied)
    ref = logits(meta_folder(tmp_path / "meta", sd))
    if kind.startswith("pt"):
        path = write_pt(tmp_path / "ckpt.pt", sd, compiled=kind == "pt-compiled")
    else:
        path = (write_v0 if kind.startswith("v0") else write_v1)(tmp_path / "model.bin", sd, tied=tied)
    args, loaded = load_checkpoint(path)
    assert args.tie_word_embeddings == tied and args.ffn_hidden == 192 and args.kv_heads == 2
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert torch.equal(logits(path), ref)


def test_v2_q8_dequantizes_like_llama2c(tmp_path):
    sd = llama2c_state_dict()
    deq = write_v2(tmp_path / "q8.bin", sd)
    _, loaded = load_checkpoint(tmp_path / "q8.bin")
    assert torch.equal(loaded["tok_embeddings.weight"], deq[0])
    assert torch.equal(loaded["layers.1.feed_forward.w3.weight"], deq[-1])
    assert torch.equal(loaded["layers.0.ffn_norm.weight"], sd["layers.0.ffn_norm.weight"])
    ref = logits(meta_folder(tmp_path / "meta", sd))
    diff = (logits(tmp_path / "q8.bin") - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()  # int8 rounding of random weights: ~3% of the largest logit


def test_unknown_version_and_truncation_are_one_line_errors(tmp_path):
    sd = llama2c_state_dict()
    bad = tmp_path / "v7.bin"
    bad.write_bytes(v1_header(7, True) + b"\0" * 64)
    with pytest.raises(LlamaMinError, match=r"llama2.c .bin version 7 is not supported \(expected 0, 1 or 2\)"):
        load_checkpoint(bad)
    data = write_v1(tmp_path / "v1.bin", sd).read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(LlamaMinError, match="file ends at byte"):
        load_checkpoint(tmp_path / "short.bin")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(LlamaMinError, match="not a llama2.c checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(LlamaMinError, match="not a GGUF file or llama2.c"):
        load_checkpoint(tmp_path / "junk.bin")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "version 7" in r.stderr


def write_tokenizer_bin(path, model_file):
    """llama2.c's tokenizer export: "\u2581" -> " ", BOS/EOS -> "\\n<s>\\n" / "\\n</s>\\n", length-prefixed bytes."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        t = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, sp.id_to_piece(i))
        tokens.append(t.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    out = [struct.pack("<I", max(len(t) for t in tokens))]
    out += [struct.pack("<fI", s, len(t)) + t for t, s in zip(tokens, scores)]
    path.write_bytes(b"".join(out))
    return sp


TEXTS = ["Hello world", " leading space", "Once upon a time, there was a little girl.", "12345 digits",
         "emoji 🦙 and ünïcödé", "tabs\tand\nnewlines  double  spaces", "Lily's dog said: \"hi!\""]


def test_tokenizer_bin_encodes_like_sentencepiece(tmp_path, fixtures_dir):
    sp = write_tokenizer_bin(tmp_path / "tokenizer.bin", fixtures_dir / "mistral-tokenizer.model.v1")
    tok = load_tokenizer(tmp_path / "tokenizer.bin")
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.n_words) == ("sentencepiece", 1, 2, 32000)
    for text in TEXTS:
        assert tok.encode(text, bos=True) == [1] + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_tokenizer_bin_is_found_beside_a_llama2c_checkpoint(tmp_path, fixtures_dir):
    write_v1(tmp_path / "stories.bin", llama2c_state_dict())
    write_tokenizer_bin(tmp_path / "tokenizer.bin", fixtures_dir / "mistral-tokenizer.model.v1")
    assert load_tokenizer(tmp_path / "stories.bin").encode("Hello world") == [22557, 1526]
    assert load_tokenizer(tmp_path).encode("Hello world") == [22557, 1526]
