"""Stop strings: matched on decoded text across token boundaries, never streamed, per row in batches."""

import torch

from llama_min.generation import cut_at_stop
from llama_min.decoding.stops import StopStrings
from llama_min.text.tokenizer import StreamDecoder
from test_generation import CharTokenizer, tiny_llama


class PairTokenizer(CharTokenizer):
    """Every id decodes to two letters, so a stop string can begin or end in the middle of a token."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) + chr(97 + (i * 7) % 26) for i in ids if i not in (1, 2))

    def stream_decoder(self):
        return StreamDecoder(self)


def test_matcher_finds_a_string_split_over_tokens_and_holds_it_back():
    tok = PairTokenizer()
    ids = [0, 3, 4, 5]  # decodes to "aa" "dv" "ec" "fj": "vec" spans the 2nd and 3rd tokens
    text = tok.decode(ids)
    assert text == "aadvecfj"
    shown = []
    m = StopStrings(tok, ["vec"], 1, on_text=lambda row, t: shown.append(t))
    stopped = [m.push(0, i) for i in ids]
    assert stopped == [False, False, True, True]
    assert m.finish(0) == "aad"
    assert "".join(shown) == "aad"  # "dv" was shown only up to "d" while "v" might start "vec"


def test_greedy_generation_with_stop_strings_equals_the_cut_plain_text():
    llama = tiny_llama(seed=5)
    llama.tokenizer = PairTokenizer()
    prompts = [[1, 40, 41], [1, 50, 51, 52, 53]]
    plain, _ = llama.generate(prompts, 20, temperature=0)
    texts = [llama.tokenizer.decode(r) for r in plain]
    stops = [texts[0][7:10], texts[1][11:14]]  # 3 letters starting mid-token somewhere in each row
    shown = {0: "", 1: ""}

    def on_text(row, t):
        shown[row] += t

    out, _ = llama.generate(prompts, 20, temperature=0, stop=stops, on_text=on_text)
    for row in range(2):
        want = cut_at_stop(texts[row], stops)
        assert llama.tokenizer.decode(out[row]).startswith(want)
        assert out[row] == plain[row][: len(out[row])]  # the same tokens as without stops, up to the stop
        assert shown[row] == want and not any(s in shown[row] for s in stops)
        assert len(out[row]) < len(plain[row]) and llama.stats.stop_reasons[row] == "stop string"


def test_text_completion_cuts_before_the_stop_string():
    llama = tiny_llama(seed=6)
    plain = llama.text_completion(["hello"], temperature=0, max_gen_len=16)[0]["generation"]
    stop = plain[5:7]
    got = llama.text_completion(["hello"], temperature=0, max_gen_len=16, stop=[stop])[0]["generation"]
    assert got == plain[: plain.find(stop)] and stop not in got


def test_stop_reasons():
    llama = tiny_llama(seed=7)
    llama.generate([[1, 9, 9]], 5, temperature=0, stop_ids=set())
    assert llama.stats.stop_reasons == ["max-new-tokens"]
    first = llama.generate([[1, 9, 9]], 5, temperature=0, stop_ids=set())[0][0][2]
    llama.generate([[1, 9, 9]], 5, temperature=0, stop_ids={first})
    assert llama.stats.stop_reasons == ["end of turn"]
    llama.generate([[1] * (llama.max_seq_len - 2)], 50, temperature=0, stop_ids=set())
    assert llama.stats.stop_reasons == ["window full"]
    assert torch.is_grad_enabled()
