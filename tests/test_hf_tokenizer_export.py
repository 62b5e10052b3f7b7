"""A tokenizer that lives inside a GGUF file, exported as a Hugging Face folder (`convert --to hf`).

Oracles: transformers' AutoTokenizer on the exported folder (how people load it) must encode as llama_min
does, BOS included exactly when llama_min puts one first, and name the special ids the GGUF names; the
`gguf` package reads those ids back from an HF -> GGUF export of that folder.
"""

import json

import pytest

from llama_min import load_tokenizer
from llama_min.checkpoint import convert
from llama_min.text.gguf_vocab import bos_eos_post_processor
from test_gguf_export_metadata import tiny_own

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# asset -> (vocabulary size, whether text goes after a BOS: what the GGUF says, or llama.cpp's default)
VOCABS = {
    "llama3-vocab-gguf": (128256, True),   # no add_bos_token key: Llama 3's pre-tokenizer means BOS
    "llama2-vocab-gguf": (32000, True),    # add_bos_token true
    "smollm2": (49152, False),             # add_bos_token false; names unknown 0 and padding 2
}
TEXTS = ["Hello world", " Hello  world\n\n", "3333 apples, naïve café, 日本語 🦙", "\tx = f(y)  # done", ""]
ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def gguf_ids(path) -> dict:
    """{"bos" | "eos" | "unk" | "pad": id or None} as the gguf package reads the file."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {short: reader.get_field(f"tokenizer.ggml.{key}") for short, key in ID_KEYS.items()}
    return {short: None if f is None else int(f.contents()) for short, f in fields.items()}


def hf_ids(hf_tok) -> dict:
    return {"bos": hf_tok.bos_token_id, "eos": hf_tok.eos_token_id, "unk": hf_tok.unk_token_id,
            "pad": hf_tok.pad_token_id}


@pytest.fixture(scope="module", params=sorted(VOCABS))
def exported(request, tmp_path_factory, require_asset):
    """(vocab GGUF, HF folder written by convert --to hf from a tiny model carrying that vocabulary)."""
    vocab = require_asset(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    own = tiny_own(folder / "own", vocab, vocab_size=VOCABS[request.param][0])
    convert(own, folder / "hf", to="hf")
    return request.param, vocab, folder / "hf"


@pytest.mark.assets
@pytest.mark.slow
def test_transformers_encodes_the_export_like_llama_min(exported):
    """Same ids for every text with special tokens on: BOS first exactly where the GGUF says (Llama 3's
    vocab, which has no add_bos_token key, included), nothing else added."""
    from transformers import AutoTokenizer

    name, vocab, hf = exported
    tok = load_tokenizer(vocab)
    assert tok.add_bos == VOCABS[name][1]
    hf_tok = AutoTokenizer.from_pretrained(hf)
    for text in TEXTS:
        assert list(hf_tok.encode(text)) == tok.encode(text, bos=tok.add_bos), (name, text)
        assert list(hf_tok(text)["input_ids"]) == tok.encode(text, bos=tok.add_bos), (name, text)
    assert load_tokenizer(hf).encode(TEXTS[2], bos=True) == tok.encode(TEXTS[2], bos=True)


@pytest.mark.assets
@pytest.mark.slow
def test_transformers_names_the_ggufs_special_ids(exported):
    """bos/eos/unk/pad ids of the export as transformers reads them = the GGUF's (None where it names none)."""
    from transformers import AutoTokenizer

    name, vocab, hf = exported
    said = gguf_ids(vocab)
    assert hf_ids(AutoTokenizer.from_pretrained(hf)) == said
    if name == "smollm2":
        assert (said["unk"], said["pad"]) == (0, 2)        # the check covers unknown and padding
    special_map = json.loads((hf / "special_tokens_map.json").read_text())
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in special_map} == special_map


@pytest.mark.assets
@pytest.mark.slow
def test_hf_to_gguf_keeps_the_special_ids(exported, tmp_path):
    """GGUF vocab -> HF folder -> GGUF: bos/eos/unknown/padding ids as the first GGUF had them, and the same
    add_bos as llama_min's tokenizer of that first file."""
    import gguf

    _, vocab, hf = exported
    convert(hf, tmp_path / "back.gguf", to="gguf")
    assert gguf_ids(tmp_path / "back.gguf") == gguf_ids(vocab)
    add_bos = gguf.GGUFReader(tmp_path / "back.gguf").get_field("tokenizer.ggml.add_bos_token").contents()
    assert add_bos == load_tokenizer(vocab).add_bos


def test_post_processor_adds_bos_and_eos_in_transformers(tmp_path):
    """The post-processor llama_min writes puts BOS first and EOS last for transformers, around each text
    of a pair; with neither asked, nothing."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    data = json.loads(tk.to_str())
    data["post_processor"] = bos_eos_post_processor(("<s>", 3), ("</s>", 4))
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert list(hf_tok.encode("a b")) == [3, 0, 1, 4]
    assert list(hf_tok.encode("a", "b")) == [3, 0, 4, 3, 1, 4]
    data["post_processor"] = bos_eos_post_processor(None, None)
    assert Tokenizer.from_str(json.dumps(data)).encode("a b").ids == [0, 1]
