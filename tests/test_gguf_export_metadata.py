"""GGUF exports keep what the source said and name a pre-tokenizer llama.cpp knows.

Oracles: the `gguf` package's GGUFReader (llama.cpp's own Python reader) for every key llama.cpp reads;
for the pre-tokenizer name, transformers' AutoTokenizer and the `tokenizers` package, which is how
llama.cpp's converter fingerprints a tokenizer (its hash table is in llama_min.formats.gguf.pretokenizer).
"""

import hashlib
import shutil

import pytest
import torch

from llama_min import ModelArgs, load_tokenizer, save_checkpoint
from llama_min.checkpoint import convert
from llama_min.cli.convert import main as convert_main
from llama_min.errors import LlamaMinError
from llama_min.formats.common import expected_shapes
from llama_min.formats.gguf.pretokenizer import (CHECK_TEXT, KNOWN_HASHES, LLAMA_CPP_PRE_NAMES, fingerprint,
                                                 llama_cpp_pre_name)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Keys the writer decides itself (the tensors' type), so they may differ from the source's
WRITER_KEYS = {"general.file_type", "general.quantization_version"}


def fields(path) -> dict:
    """{key: (GGUF value types, contents)} of every metadata key, read by the gguf package."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tiny_own(folder, tokenizer_file=None, vocab_size=256, dtype=torch.float32, tokenizer_name=None, **over):
    """A small random llama_min checkpoint (with `tokenizer_file` copied beside it, as `tokenizer_name`)."""
    args = ModelArgs(**dict(dict(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, hidden_dim=32,
                                 max_seq_len=64, tie_word_embeddings=True), **over))
    g = torch.Generator().manual_seed(0)
    sd = {k: (0.1 * torch.randn(s, generator=g)).to(dtype) for k, s in expected_shapes(args).items()}
    sd["output.weight"] = sd["tok_embeddings.weight"]
    save_checkpoint(folder, args, sd)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / (tokenizer_name or tokenizer_file.name))
    return folder


# ------------------------------------------------------------------------------------- GGUF -> GGUF

@pytest.mark.assets
@pytest.mark.slow
def test_gguf_round_trip_keeps_every_key_llama_cpp_reads(tmp_path, smollm2_path):
    """SmolLM2's GGUF -> f16 GGUF: every metadata key of the source comes back with its value and its type
    (llama.cpp checks both), the tensor type aside. That covers all llama.cpp reads for a Llama model."""
    convert(smollm2_path, tmp_path / "out.gguf", to="gguf")
    src, out = fields(smollm2_path), fields(tmp_path / "out.gguf")
    read_by_llama_cpp = [
        "general.architecture", "general.name", "llama.context_length", "llama.embedding_length",
        "llama.block_count", "llama.feed_forward_length", "llama.rope.dimension_count", "llama.rope.freq_base",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
        "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
    assert set(read_by_llama_cpp) <= set(src)               # the source has them all, so the check is real
    for key in sorted(set(src) - WRITER_KEYS):
        assert key in out, key
        assert out[key] == src[key], key
    assert out["general.file_type"][1] == 1                  # f16 (the default from a dequantized GGUF)


@pytest.mark.assets
def test_sentencepiece_vocab_keeps_llama_cpps_keys(tmp_path, require_asset):
    """Llama 2's vocab GGUF (sentencepiece) as the tokenizer of a small model: tokens, scores, types, ids and
    flags as llama.cpp's file has them, and pre 'default' (what llama.cpp's converter writes for it)."""
    vocab = require_asset("llama2-vocab-gguf")
    convert(tiny_own(tmp_path / "own", vocab, vocab_size=32000), tmp_path / "out.gguf", to="gguf")
    src, out = fields(vocab), fields(tmp_path / "out.gguf")
    for key in ("model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id",
                "unknown_token_id", "add_bos_token"):
        assert out[f"tokenizer.ggml.{key}"] == src[f"tokenizer.ggml.{key}"], key
    assert out["tokenizer.ggml.pre"][1] == "default"


# ----------------------------------------------------------------------------------- pre-tokenizer names

def test_sentencepiece_tokenizer_is_named_default(tmp_path, fixtures_dir):
    """A tokenizer.model (sentencepiece) gets pre 'default', as llama.cpp's converter writes for one."""
    own = tiny_own(tmp_path / "own", fixtures_dir / "mistral-tokenizer.model.v1", vocab_size=32000,
                   tokenizer_name="tokenizer.model")
    convert(own, tmp_path / "out.gguf", to="gguf")
    out = fields(tmp_path / "out.gguf")
    assert out["tokenizer.ggml.model"][1] == "llama" and out["tokenizer.ggml.pre"][1] == "default"
    assert out["general.name"][1] == "own"


def test_known_names_are_ones_llama_cpp_accepts():
    assert set(KNOWN_HASHES.values()) <= LLAMA_CPP_PRE_NAMES
    assert "gpt2" not in LLAMA_CPP_PRE_NAMES                 # what llama_min once wrote, and llama.cpp refused
    # llama.cpp's check text, pinned: one changed character and no hash in the table would match
    assert hashlib.sha256(CHECK_TEXT.encode()).hexdigest() == \
        "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_hf_export_is_named_smollm(tmp_path, smollm2_path):
    """SmolLM2 -> HF folder (llama_min writes tokenizer.json) -> GGUF: 'smollm', as llama.cpp's converter
    names that folder (transformers' encode hashed the same way), and llama_min encodes the check text
    exactly as the `tokenizers` package does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = tmp_path / "hf"
    convert(smollm2_path, hf, to="hf")
    ours = load_tokenizer(hf)
    theirs = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(CHECK_TEXT, add_special_tokens=False).ids
    assert ours.encode(CHECK_TEXT) == theirs
    as_llama_cpp = AutoTokenizer.from_pretrained(hf).encode(CHECK_TEXT)
    assert KNOWN_HASHES[hashlib.sha256(str(as_llama_cpp).encode()).hexdigest()] == "smollm"
    convert(hf, tmp_path / "out.gguf", to="gguf")
    out = fields(tmp_path / "out.gguf")
    assert out["tokenizer.ggml.pre"][1] == "smollm"
    assert out["general.name"][1] == "hf"                     # the source folder's name, not a placeholder


@pytest.mark.assets
@pytest.mark.slow
def test_llama3_vocab_through_hf_keeps_its_own_pre(tmp_path, require_asset):
    """Llama 3's vocab GGUF -> HF folder -> GGUF: the name its GGUF says ('llama-bpe'); Meta's tiktoken
    tokenizer.model fingerprints the same (BOS first: the tokenizer puts one before plain text)."""
    vocab = require_asset("llama3-vocab-gguf")
    own = tiny_own(tmp_path / "own", vocab, vocab_size=128256)
    convert(own, tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "out.gguf", to="gguf")
    said = fields(vocab)["tokenizer.ggml.pre"][1]
    assert said == "llama-bpe" and fields(tmp_path / "out.gguf")["tokenizer.ggml.pre"][1] == said
    tiktoken = load_tokenizer(require_asset("llama3-tokenizer"))
    assert tiktoken.kind == "tiktoken" and llama_cpp_pre_name(tiktoken) == "llama-bpe"
    assert fingerprint(tiktoken) == fingerprint(load_tokenizer(tmp_path / "hf"))


def byte_level_tokenizer_json(folder):
    """A byte-level BPE tokenizer.json no model ships (256 byte tokens, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llama_min.text.gguf_vocab import byte_level_encode

    tk = Tokenizer(models.BPE(vocab={byte_level_encode(bytes([b])): b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_unknown_vocabulary_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    own = tiny_own(tmp_path / "own", byte_level_tokenizer_json(tmp_path / "tok"))
    with pytest.raises(LlamaMinError, match="not one llama.cpp knows"):
        convert(own, tmp_path / "out.gguf", to="gguf")
    assert convert_main([str(own), str(tmp_path / "out.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "llama.cpp" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own", "tok"]   # no file, no temp leftover


# ------------------------------------------------------------------------------------------ tensor types

@pytest.mark.parametrize("dtype, source, expect", [
    ("float32", torch.float32, "F32"), ("bfloat16", torch.float32, "BF16"), ("float16", torch.float32, "F16"),
    (None, torch.float32, "F16"), (None, torch.bfloat16, "BF16")])
def test_gguf_type_follows_dtype(tmp_path, capsys, dtype, source, expect):
    """--dtype picks the tensor type when --gguf-type is not given; with neither, bf16 stays bf16 and
    anything else becomes f16 (llama.cpp's converter's rule). The command says what it wrote."""
    import gguf

    own = tiny_own(tmp_path / "own", dtype=source)
    out = tmp_path / "out.gguf"
    assert convert_main([str(own), str(out), "--to", "gguf"] + (["--dtype", dtype] if dtype else [])) == 0
    matrix = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight")
    assert matrix.tensor_type.name == expect
    assert f"(GGUF, {expect} tensors, " in capsys.readouterr().err


def test_gguf_type_wins_over_dtype(tmp_path, capsys):
    own = tiny_own(tmp_path / "own")
    assert convert_main([str(own), str(tmp_path / "q.gguf"), "--to", "gguf", "--dtype", "float32",
                         "--gguf-type", "q8_0"]) == 0
    assert "(GGUF, Q8_0 tensors, " in capsys.readouterr().err


def test_help_lists_the_formats_from_the_table(capsys):
    from llama_min.formats import CHECKPOINT_FORMATS

    assert convert_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, shape, _ in CHECKPOINT_FORMATS.values():
        assert f"{name} ({' '.join(shape.split())})" in text


def test_context_length_is_the_trained_window(tmp_path):
    """llama_min runs at most 8192 positions, but the export says the window the source was trained for."""
    own = tiny_own(tmp_path / "own", trained_window=131072)
    convert(own, tmp_path / "out.gguf", to="gguf")
    assert fields(tmp_path / "out.gguf")["llama.context_length"][1] == 131072
