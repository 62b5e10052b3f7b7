"""Export: GGUF (f32/f16/bf16/Q8_0 + tokenizer + chat template) checked with transformers' GGUF loader, the
gguf package's reader and llama.cpp's own vocab files; Hugging Face folders checked with transformers'
generate (stops at the end of a chat turn)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_min import ModelArgs, load_checkpoint, load_tokenizer, save_checkpoint
from llama_min.checkpoint import build_transformer
from llama_min.errors import LlamaMinError
from llama_min.formats.gguf.write import save_gguf
from llama_min.formats.hf import save_hf

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SHAPES = {
    "gqa": dict(n_kv_heads=2),
    "tied-llama3-scaled": dict(n_kv_heads=1, tie_word_embeddings=True, rope_theta=500000.0, use_scaled_rope=True,
                               rope_scaling_factor=32.0, rope_original_max_pos=32),
    "head-dim-32": dict(n_kv_heads=2, head_dim=32),
}


def random_model(seed=0, **over):
    args = ModelArgs(**dict(dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=96, max_seq_len=128),
                            **over))
    g = torch.Generator().manual_seed(seed)
    from llama_min.formats.common import expected_shapes

    sd = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
          for k, s in expected_shapes(args).items()}
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return args, sd


def tokens(vocab=256, n=33):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def our_logits(args, sd, x):
    with torch.no_grad():
        return build_transformer(args, sd).eval()(x)


def reader_field(path, key):
    import gguf

    field = gguf.GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


# ------------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gguf_f32_round_trip(tmp_path, shape):
    args, sd = random_model(**SHAPES[shape])
    save_gguf(tmp_path / "m.gguf", args, sd, qtype="f32")
    back_args, back = load_checkpoint(tmp_path / "m.gguf")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert (back_args.tie_word_embeddings, back_args.hd, back_args.kv_heads) == (args.tie_word_embeddings, args.hd,
                                                                                 args.kv_heads)
    diff = (our_logits(back_args, back, tokens()) - our_logits(args, sd, tokens())).abs().max().item()
    assert diff <= (1e-5 if args.use_scaled_rope else 0.0)  # scaled RoPE comes back as per-pair divisors


@pytest.mark.parametrize("qtype, tol", [("f32", 0), ("f16", 1e-2), ("bf16", 5e-2), ("q8_0", 5e-2)])
def test_gguf_loads_in_transformers_like_in_llama_min(tmp_path, qtype, tol):
    from transformers import AutoModelForCausalLM

    args, sd = random_model(n_kv_heads=2)
    save_gguf(tmp_path / "m.gguf", args, sd, qtype=qtype)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    back_args, back = load_checkpoint(tmp_path / "m.gguf")
    ours = our_logits(back_args, back, tokens())
    with torch.no_grad():
        diff = (hf(tokens()).logits - ours).abs().max().item()
    drift = (ours - our_logits(args, sd, tokens())).abs().max().item()
    scale = ours.abs().max().item()
    print(f"[gguf {qtype}] transformers vs llama_min: {diff:.1e}; vs the float32 source: {drift:.1e} "
          f"(largest logit {scale:.1f})")
    assert diff <= 1e-5 and drift <= tol * scale  # tol: rounding of the stored type, relative
    assert (drift == 0) == (qtype == "f32")


def test_q8_0_blocks_follow_the_format(tmp_path):
    """Each Q8_0 block of 32: fp16 d = max|w| / 127, then 32 int8 q = round(w / d) (d before its fp16
    rounding); the stored weight is fp16(d) * q."""
    import gguf

    args, sd = random_model(n_kv_heads=2)
    save_gguf(tmp_path / "m.gguf", args, sd, qtype="q8_0")
    t = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    raw = np.asarray(t.data).reshape(-1, 34)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    q = raw[:, 2:].copy().view(np.int8).astype(np.float32)
    w = sd["layers.1.feed_forward.w2.weight"].numpy().reshape(-1, 32)
    assert np.allclose(d[:, 0], np.float16(np.abs(w).max(axis=1) / 127), rtol=1e-3)
    q_ref = np.round(w / (np.abs(w).max(axis=1, keepdims=True) / 127))
    assert np.abs(q - q_ref).max() <= 1 and (q == q_ref).mean() > 0.999  # (float rounding at .5 ties)
    _, back = load_checkpoint(tmp_path / "m.gguf")
    assert torch.equal(back["layers.1.feed_forward.w2.weight"], torch.from_numpy((d * q).reshape(64, 96)))
    assert reader_field(tmp_path / "m.gguf", "general.file_type") == 7


TEXTS = ["Hello world", " leading space", "Once upon a time, there was a little girl.", "12345 digits 3.14",
         "emoji 🦙 and ünïcödé", "tabs\tand\nnewlines  double  spaces", "<|im_start|> and <s> as plain text"]


def test_sentencepiece_vocab_is_embedded(tmp_path, fixtures_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(fixtures_dir / "mistral-tokenizer.model.v1"))
    tok = load_tokenizer(fixtures_dir / "mistral-tokenizer.model.v1")
    args, sd = random_model(vocab_size=32010)            # 10 more rows than tokens: padded as unused
    save_gguf(tmp_path / "m.gguf", args, sd, tok, qtype="f16", chat_template="{{ messages }}")
    path = tmp_path / "m.gguf"
    assert reader_field(path, "tokenizer.ggml.model") == "llama"
    pieces = reader_field(path, "tokenizer.ggml.tokens")
    types = reader_field(path, "tokenizer.ggml.token_type")
    scores = reader_field(path, "tokenizer.ggml.scores")
    assert pieces[:32000] == [sp.id_to_piece(i) for i in range(32000)] and len(pieces) == 32010
    assert np.allclose(scores[:32000], [sp.get_score(i) for i in range(32000)])
    expect = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(32000)]
    assert list(types) == expect + [5] * 10
    assert [reader_field(path, f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "add_bos_token")] \
        == [1, 2, True]
    assert reader_field(path, "tokenizer.chat_template") == "{{ messages }}"
    back = load_tokenizer(path)
    for text in TEXTS:
        assert back.encode(text, bos=True) == [1] + sp.encode(text), text


def test_byte_level_vocab_matches_llama_cpps_smollm2_file(tmp_path, smollm2_path):
    from llama_min.files.gguf import read_gguf_metadata

    tok = load_tokenizer(smollm2_path)
    args, sd = random_model(vocab_size=49152, n_layers=1)
    save_gguf(tmp_path / "m.gguf", args, sd, tok)
    src = read_gguf_metadata(smollm2_path, prefix="tokenizer.")
    out = read_gguf_metadata(tmp_path / "m.gguf", prefix="tokenizer.")
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert out[f"tokenizer.ggml.{key}"] == src[f"tokenizer.ggml.{key}"], key
    assert out["tokenizer.chat_template"] == src["tokenizer.chat_template"]
    back = load_tokenizer(tmp_path / "m.gguf")
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.encode_dialog([{"role": "user", "content": "Hi"}]) == tok.encode_dialog([{"role": "user",
                                                                                             "content": "Hi"}])


@pytest.mark.slow
def test_tiktoken_vocab_matches_llama_cpps_llama3_file(tmp_path, require_asset):
    """Llama 3's tiktoken ranks -> GGUF 'gpt2' vocabulary: the 280147 merges llama.cpp's file carries."""
    from llama_min.files.gguf import read_gguf_metadata

    tok = load_tokenizer(require_asset("llama3-tokenizer"))
    reference = read_gguf_metadata(require_asset("llama3-vocab-gguf"), prefix="tokenizer.")
    args, sd = random_model(vocab_size=128256, dim=32, n_heads=2, hidden_dim=32, n_layers=1)
    save_gguf(tmp_path / "m.gguf", args, sd, tok)
    out = read_gguf_metadata(tmp_path / "m.gguf", prefix="tokenizer.")
    assert out["tokenizer.ggml.merges"] == reference["tokenizer.ggml.merges"]
    assert out["tokenizer.ggml.token_type"] == reference["tokenizer.ggml.token_type"]
    differ = [i for i, (a, b) in enumerate(zip(out["tokenizer.ggml.tokens"], reference["tokenizer.ggml.tokens"]))
              if a != b]
    # llama.cpp's file has Llama 3.0's special-token names; llama_min gives a lone tokenizer.model 3.1's
    # (<|finetune_right_pad_id|> 128004, <|eom_id|> 128008, <|python_tag|> 128010, reserved ones renumbered)
    assert differ == [128004, 128005, 128008, *range(128010, 128256)]
    assert out["tokenizer.ggml.pre"] == "llama-bpe" and out["tokenizer.ggml.eot_token_id"] == 128009
    back = load_tokenizer(tmp_path / "m.gguf")
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)


def test_bad_export_requests_are_clear(tmp_path):
    args, sd = random_model()
    with pytest.raises(LlamaMinError, match="GGUF type 'q4_k': expected one of f32, f16, bf16, q8_0"):
        save_gguf(tmp_path / "m.gguf", args, sd, qtype="q4_k")
    assert not (tmp_path / "m.gguf").exists()


def test_convert_script_writes_gguf(tmp_path, fixtures_dir):
    import shutil

    args, sd = random_model(vocab_size=32000)
    save_checkpoint(tmp_path / "own", args, sd)
    shutil.copyfile(fixtures_dir / "mistral-tokenizer.model.v1", tmp_path / "own" / "tokenizer.model")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(tmp_path / "own"),
                        str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "q8_0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert reader_field(tmp_path / "m.gguf", "general.file_type") == 7
    assert load_tokenizer(tmp_path / "m.gguf").encode("Hello world") == [22557, 1526]
    back_args, back = load_checkpoint(tmp_path / "m.gguf")
    ref = our_logits(args, sd, tokens())
    diff = (our_logits(back_args, back, tokens()) - ref).abs().max().item()
    assert 0 < diff < 5e-2 * ref.abs().max().item()  # Q8_0 rounding, relative to the largest logit


# --------------------------------------------------------------------------------------------- Hugging Face

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def llama3_style_tokenizer(folder: Path):
    """A byte-level BPE tokenizer.json (256 byte tokens, no merges) + Llama 3's chat special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from llama_min.text.gguf_vocab import byte_level_encode

    vocab = {byte_level_encode(bytes([b])): b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": TEMPLATE}))
    return load_tokenizer(folder)


def always_says(args, sd, token_id: int):
    """Make greedy decoding pick `token_id` every step: feature 0 of the residual stream is kept large and
    positive, the final norm passes only feature 0, and only that token's output row reads it."""
    sd = {k: v.clone() for k, v in sd.items()}
    sd["tok_embeddings.weight"][:, 0] = 5.0
    for k in sd:
        if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[k] *= 0.01
    sd["norm.weight"].zero_()
    sd["norm.weight"][0] = 1.0
    sd["output.weight"][:, 0] = -1.0
    sd["output.weight"][token_id, 0] = 1.0
    return sd


def test_hf_export_stops_generate_at_end_of_turn(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = llama3_style_tokenizer(tmp_path / "tok")
    eos, eot = tok.token_id("<|end_of_text|>"), tok.token_id("<|eot_id|>")
    assert tok.stop_ids == {eos, eot}
    args, sd = random_model(vocab_size=tok.n_words)
    sd = always_says(args, sd, eot)
    out = save_hf(tmp_path / "hf", args, sd, tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and "torch_dtype" not in cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_id, eos)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": tok.bos_id, "eos_token_id": [eos, eot]}
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE

    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert prompt == tok.encode_dialog([{"role": "user", "content": "Hi"}])
    model = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([prompt])
    new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert new == [eot]                                    # one token: the end of the turn, then stop
    (out / "generation_config.json").unlink()             # the old export: EOS only
    model = LlamaForCausalLM.from_pretrained(out).eval()
    assert model.generate(ids, max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist() == [eot] * 8


def test_hf_export_keeps_bf16_dtype(tmp_path, fixtures_dir):
    args, sd = random_model(vocab_size=32000)
    tok = load_tokenizer(fixtures_dir / "mistral-tokenizer.model.v1")
    out = save_hf(tmp_path / "hf", args, {k: v.bfloat16() for k, v in sd.items()}, tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert load_tokenizer(out).encode("Hello world") == [22557, 1526]


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_q8_0_gguf_in_transformers(tmp_path, smollm2_path):
    """A LoRA fine-tune of the default model (2 steps through `llama-min train`, merged on export), exported as
    Q8_0: transformers' GGUF loader and llama_min agree on the file."""
    from transformers import AutoModelForCausalLM

    from llama_min.cli.train import main as train_main

    (tmp_path / "text.txt").write_text("Shall I compare thee to a summer's day? Thou art more lovely. " * 40)
    code = train_main(["--init", str(smollm2_path), "--data", str(tmp_path / "text.txt"), "--out",
                       str(tmp_path / "run"), "--lora-rank", "4", "--lr", "1e-2", "--max-steps", "2",
                       "--batch-size", "1", "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "0"])
    assert code == 0
    args, sd = load_checkpoint(tmp_path / "run" / "final")
    base_args, base = load_checkpoint(smollm2_path)
    assert (sd["layers.0.attention.wq.weight"] - base["layers.0.attention.wq.weight"]).abs().max() > 0  # tuned
    del base
    save_gguf(tmp_path / "smollm2-q8_0.gguf", args, sd, load_tokenizer(tmp_path / "run" / "final"), qtype="q8_0")
    del sd
    x = torch.tensor([load_tokenizer(smollm2_path).encode("Once upon a time, there was a little girl named")])
    back_args, back = load_checkpoint(tmp_path / "smollm2-q8_0.gguf")
    ours = our_logits(back_args, back, x)
    del back
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smollm2-q8_0.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(x).logits - ours).abs().max().item()
    print(f"[gguf q8_0 SmolLM2] transformers vs llama_min max|dlogits| = {diff:.1e}")
    assert diff <= 1e-2


@pytest.mark.slow
def test_smollm2_hf_export_answers_and_stops(tmp_path, smollm2_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = load_tokenizer(smollm2_path)
    args, sd = load_checkpoint(smollm2_path)
    save_hf(tmp_path / "hf", args, sd, tokenizer=tok)
    del sd
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.encode_dialog(dialog)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    new = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert new[-1] == tok.token_id("<|im_end|>") and len(new) < 40
    assert hf_tok.decode(new[:-1]).strip() == "The capital of France is Paris."
