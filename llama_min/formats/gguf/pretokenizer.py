"""Which `tokenizer.ggml.pre` a GGUF export names, so that llama.cpp splits text the way the tokenizer does.

A byte-level BPE vocabulary ('gpt2' in GGUF) is only half a tokenizer: before the merges, text is cut into
pieces by a pre-tokenizer (a regex, digits split one by one or three by three, ...). GGUF stores no regex;
it names the pre-tokenizer, and llama.cpp maps the name to its own hard-coded rules. A name it does not
know makes it refuse the file ("unknown pre-tokenizer type").

llama.cpp's own converter (convert_hf_to_gguf.py) cannot read the rules out of a tokenizer.json either, so
it *fingerprints* the tokenizer: it encodes one fixed text full of hard cases (runs of spaces, tabs and
newlines, emoji with joiners, digit runs of every length, Khmer, Chinese, Cyrillic, repeated punctuation,
English contractions in odd cases), hashes the ids and looks the hash up in a table of tokenizers its
authors checked by hand. Two tokenizers with the same ids on that text get the same name.

This module does the same with llama_min's own tokenizers:

  ids  = tok.encode(CHECK_TEXT, bos=tok.add_bos)        llama_min's tokenizer, not Hugging Face's
  hash = sha256 of the UTF-8 text of str(ids)           Python's list repr: "[1, 2, 3]"
  name = KNOWN_HASHES[hash]                             or a LlamaMinError: llama.cpp would refuse the file

The BOS id leads the list when the tokenizer puts one before plain text, because llama.cpp's converter
hashes `AutoTokenizer.encode(text)`, which adds the tokenizer's special tokens: Meta's Llama 3 tokenizer
starts with <|begin_of_text|> and hashes to 'llama-bpe'; the same vocabulary without the BOS is the hash
llama.cpp lists for Smaug-Llama-3 ('smaug-bpe', the same split rules).

A sentencepiece vocabulary ('llama' in GGUF) has no pre-tokenizer step in llama.cpp: its converter writes
'default' and llama.cpp ignores the name for such vocabularies.

The hashes below are the ones llama.cpp's converter lists for vocabularies of Llama-architecture models
(reference checkpoint in the comment); LLAMA_CPP_PRE_NAMES is every name its loader (src/llama-vocab.cpp)
accepts, taken from the llama.cpp release vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import hashlib

from ...errors import LlamaMinError

# The text llama.cpp's converter encodes to fingerprint a tokenizer (byte for byte: the hash depends on it).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHECK_TEXT)) -> tokenizer.ggml.pre, for vocabularies of Llama-architecture checkpoints
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",       # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",       # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",          # SmolLM(2)-135M
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",    # deepseek-llm-7b
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",         # Falcon3-7B
}

# Every tokenizer.ggml.pre llama.cpp's loader accepts for a 'gpt2' vocabulary (anything else: it refuses)
LLAMA_CPP_PRE_NAMES = frozenset("""
    default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
    deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es jina-de
    gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m
    sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen kormo
    f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm
    codeshell bloom gpt3-finnish exaone exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2
    talkie granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe
    bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka grok-2 afmoe
    laguna minimax-m2 solar-open mellum2
""".split())


def fingerprint(tok) -> str:
    """sha256 (hex) of the ids `tok` gives CHECK_TEXT, BOS first when the tokenizer adds one to plain text."""
    ids = [int(i) for i in tok.encode(CHECK_TEXT, bos=bool(tok.add_bos))]
    return hashlib.sha256(str(ids).encode("utf-8")).hexdigest()


def llama_cpp_pre_name(tok) -> str:
    """The `tokenizer.ggml.pre` llama.cpp uses for `tok`'s split rules, or a LlamaMinError when it has none.

    'default' for a sentencepiece vocabulary; for a byte-level BPE the name its fingerprint has.
    """
    if tok.kind == "sentencepiece":
        return "default"
    digest = fingerprint(tok)
    if digest not in KNOWN_HASHES:
        known = ", ".join(sorted(set(KNOWN_HASHES.values())))
        raise LlamaMinError(f"this byte-level BPE tokenizer is not one llama.cpp knows (fingerprint sha256 "
                            f"{digest[:16]}..., known: {known}), so no tokenizer.ggml.pre fits it and "
                            "llama.cpp would refuse the GGUF file; export to own or hf instead")
    return KNOWN_HASHES[digest]
