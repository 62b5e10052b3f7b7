"""Generation semantics on tiny random models: sampling worked examples, ragged batches, cache, chat."""

import pytest
import torch

from llama_min import ModelArgs, Transformer
from llama_min.decoding.session import ChatSession
from llama_min.generation import Llama, Sampling, apply_repetition_penalty, sample_next, sample_top_p

V = 128


class CharTokenizer:
    """A stand-in tokenizer: one id per ASCII character, BOS 1, EOS 2, a toy chat format."""

    bos_id, eos_id, n_words, add_bos = 1, 2, V, True
    stop_ids = {2}

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [ord(c) % V for c in text] + [2] * eos

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def stream_decoder(self):
        from llama_min.text.tokenizer import StreamDecoder

        return StreamDecoder(self)

    def encode_dialog(self, dialog):
        ids = [1]
        for m in dialog:
            ids += self.encode(f"<{m['role'][0]}>{m['content']}") + [3]
        return ids + self.encode("<a>")


def tiny_llama(seed=0, max_seq_len=96, batch=4, **over):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, hidden_dim=128,
                     max_seq_len=max_seq_len, **over)
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return Llama(model, CharTokenizer(), max_seq_len=max_seq_len, max_batch_size=batch)


# ------------------------------------------------------------------------------------------------
# Sampling, with worked examples
# ------------------------------------------------------------------------------------------------


def draw(probs, p, n=4000):
    g = torch.Generator().manual_seed(0)
    batch = torch.tensor(probs).expand(n, -1)
    return torch.bincount(sample_top_p(batch, p, g), minlength=len(probs)) / n


def metas_top_p(probs, p, g):
    """Meta's sample_top_p, re-typed from its description: the full sort, as the oracle."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1, generator=g)).squeeze(-1)


@pytest.mark.parametrize("vocab", [49152, 5000])
def test_top_p_without_the_full_sort_draws_metas_tokens_and_random_stream(vocab):
    """sorted_for_top_p sorts only the k largest: the token drawn and the generator's state after the draw
    equal the full sort's, with ties in the nucleus (then it sorts everything), batches, flat and peaked rows."""
    from llama_min.decoding.sampling import sorted_for_top_p

    torch.manual_seed(0)
    shortcut = 0
    for trial in range(120):
        logits = torch.randn(1 + trial % 3, vocab) * 4
        if trial % 4 == 0:
            logits[:, ::3] = logits[:, :1]  # the top value repeated: ties inside the nucleus
        if trial % 5 == 0:
            logits = logits.round()
        probs = torch.softmax(logits / (0.3, 0.6, 1.0, 2.0)[trial % 4], dim=-1)
        p = (0.5, 0.9, 0.95)[trial % 3]
        g_meta, g_ours = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        assert torch.equal(sample_top_p(probs, p, g_ours), metas_top_p(probs.clone(), p, g_meta)), trial
        assert torch.equal(g_ours.get_state(), g_meta.get_state()), trial
        shortcut += bool((sorted_for_top_p(probs, p)[0][:, 1024:] == 0).all())
    assert 20 < shortcut < 120  # both the shortcut and the full sort were exercised


def test_top_p_keeps_the_token_that_crosses_p():
    # probs 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95. With p = 0.9 the first three are
    # kept (0.8 <= 0.9: the token crossing 0.9 stays), renormalised to 0.5/0.95, 0.3/0.95, 0.15/0.95.
    freq = draw([0.5, 0.3, 0.15, 0.05], 0.9)
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], torch.tensor([0.526, 0.316, 0.158]), atol=0.03, rtol=0)
    # With p = 0.5: mass before the 2nd token is exactly 0.5 <= 0.5, so it is kept too.
    freq = draw([0.5, 0.3, 0.15, 0.05], 0.5)
    assert freq[2] == freq[3] == 0 and freq[1] > 0.3
    # With p = 0.4 only the top token survives.
    assert draw([0.5, 0.3, 0.15, 0.05], 0.4)[0] == 1.0


def test_top_k_and_min_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(3000, -1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, Sampling(temperature=1.0, top_p=1.0, top_k=2), generator=g)
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next(logits, Sampling(temperature=1.0, top_p=1.0, min_p=0.6), generator=g)  # >= 0.24
    assert set(picks.tolist()) == {0, 1}


def test_greedy_is_argmax_and_temperature_sharpens():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    assert sample_next(logits, Sampling(temperature=0)).item() == 1
    g = torch.Generator().manual_seed(0)
    cold = sample_next(logits.expand(2000, -1), Sampling(temperature=0.05, top_p=1.0), generator=g)
    hot = sample_next(logits.expand(2000, -1), Sampling(temperature=2.0, top_p=1.0), generator=g)
    assert (cold == 1).float().mean() > 0.85 and (hot == 1).float().mean() < 0.5


def test_repetition_penalty_worked_example():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, -1]]), 2.0)  # -1 is padding
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert sample_next(logits, Sampling(temperature=0, repetition_penalty=4.0), torch.tensor([[0]])).item() == 2


def test_bad_sampling_settings():
    nan = float("nan")
    for bad in (dict(temperature=-1), dict(temperature=nan), dict(top_p=1.5), dict(top_p=nan), dict(top_k=0),
                dict(min_p=2.0), dict(repetition_penalty=0), dict(repetition_penalty=nan)):
        with pytest.raises(ValueError):
            Sampling(**bad)


# ------------------------------------------------------------------------------------------------
# generate()
# ------------------------------------------------------------------------------------------------


def greedy_reference(llama, prompt, n):
    """Greedy decoding by full forwards without any cache: the independent reference."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(llama.model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[1, 50, 60, 70], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 99, 98]]


def test_greedy_equals_uncached_reference():
    llama = tiny_llama()
    out, _ = llama.generate([PROMPTS[0]], max_gen_len=20, temperature=0, stop_ids=set())
    assert out[0] == greedy_reference(llama, PROMPTS[0], 20)


def test_ragged_batch_equals_one_by_one():
    llama = tiny_llama()
    batch, _ = llama.generate(PROMPTS, max_gen_len=16, temperature=0, stop_ids=set())
    for prompt, row in zip(PROMPTS, batch):
        single, _ = llama.generate([prompt], max_gen_len=16, temperature=0, stop_ids=set())
        assert row == single[0] and len(row) == 16


def test_seed_reproducibility():
    llama = tiny_llama()
    a, _ = llama.generate(PROMPTS, max_gen_len=24, temperature=1.0, top_p=0.95, seed=7, stop_ids=set())
    b, _ = llama.generate(PROMPTS, max_gen_len=24, temperature=1.0, top_p=0.95, seed=7, stop_ids=set())
    c, _ = llama.generate(PROMPTS, max_gen_len=24, temperature=1.0, top_p=0.95, seed=8, stop_ids=set())
    assert a == b and a != c


def test_stop_token_ends_row_and_is_not_returned():
    llama = tiny_llama()
    free, _ = llama.generate([PROMPTS[0]], max_gen_len=20, temperature=0, stop_ids=set())
    stop = free[0][5]
    first = free[0].index(stop)
    out, _ = llama.generate([PROMPTS[0]], max_gen_len=20, temperature=0, stop_ids={stop})
    assert out[0] == free[0][:first]


def test_logprobs_and_echo_match_full_forward():
    llama = tiny_llama()
    prompt = PROMPTS[1]
    out, lps = llama.generate([prompt], max_gen_len=8, temperature=0.8, logprobs=True, echo=True, seed=3,
                              stop_ids=set())
    seq = out[0]
    assert seq[: len(prompt)] == prompt and len(seq) == len(prompt) + 8
    with torch.no_grad():
        lp = torch.log_softmax(llama.model(torch.tensor([seq])), dim=-1)[0]
    want = [0.0] + [lp[t - 1, seq[t]].item() for t in range(1, len(seq))]  # shifted targets
    torch.testing.assert_close(torch.tensor(lps[0]), torch.tensor(want), atol=1e-4, rtol=1e-4)
    out2, lps2 = llama.generate([prompt], max_gen_len=8, temperature=0.8, logprobs=True, seed=3, stop_ids=set())
    assert out2[0] == seq[len(prompt):] and lps2[0] == pytest.approx(want[len(prompt):], abs=1e-4)


def test_cache_sized_to_the_request(monkeypatch):
    llama = tiny_llama(max_seq_len=4096)
    sizes = []
    real = llama.model.setup_cache
    monkeypatch.setattr(llama.model, "setup_cache", lambda b, n, **kw: (sizes.append((b, n)), real(b, n, **kw)))
    llama.generate(PROMPTS, max_gen_len=5, temperature=0)
    assert sizes == [(3, 15)]  # longest prompt 10 + 5 new tokens, not the 4096 window
    assert llama.model.cache_len == 0  # released after the call


def test_prompt_longer_than_window():
    llama = tiny_llama(max_seq_len=32)
    with pytest.raises(ValueError, match="does not fit the window of 32 tokens"):
        llama.generate([[1] * 40], max_gen_len=4)
    with pytest.raises(ValueError, match="max_batch_size"):
        llama.generate([[1]] * 5, max_gen_len=4)


def test_on_token_streams_every_generated_token():
    llama = tiny_llama()
    seen = {0: [], 1: []}
    out, _ = llama.generate(PROMPTS[:2], max_gen_len=6, temperature=0, stop_ids=set(),
                            on_token=lambda row, t: seen[row].append(t))
    assert seen[0] == out[0] and seen[1] == out[1]
    stop = out[0][2]
    seen = {0: []}
    out, _ = llama.generate(PROMPTS[:1], max_gen_len=6, temperature=0, stop_ids={stop},
                            on_token=lambda row, t: seen[row].append(t))
    assert seen[0] == out[0] and stop not in seen[0]  # the stop token is never streamed


def test_text_completion_and_chat_completion_shapes():
    llama = tiny_llama()
    res = llama.text_completion(["abc", "hello"], temperature=0, max_gen_len=5, logprobs=True)
    assert len(res) == 2 and isinstance(res[0]["generation"], str) and len(res[0]["logprobs"]) == len(res[0]["tokens"])
    res = llama.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0, max_gen_len=5)
    assert res[0]["generation"]["role"] == "assistant"


# ------------------------------------------------------------------------------------------------
# Chat sessions keep their cache
# ------------------------------------------------------------------------------------------------


def test_chat_session_reuses_cache_and_matches_full_prefill(monkeypatch):
    llama = tiny_llama(max_seq_len=256, batch=1)
    tok = llama.tokenizer
    session = ChatSession(llama, system="sys", temperature=0)
    fed = []
    real_step = llama.step
    monkeypatch.setattr(llama, "step", lambda t, start_pos=0, **kw: (fed.append(t.shape[1]), real_step(t, start_pos, **kw))[1])
    a1 = session.ask("hi", max_gen_len=10)
    prefill_1 = fed[0]
    fed.clear()
    a2 = session.ask("more", max_gen_len=10)
    dialog = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": a1}, {"role": "user", "content": "more"}]
    full = tok.encode_dialog(dialog)
    assert fed[0] < len(full) and prefill_1 == len(tok.encode_dialog(dialog[:2]))  # only new tokens prefilled
    # The same turn answered from scratch (whole dialog prefilled) gives the same tokens.
    monkeypatch.setattr(llama, "step", real_step)
    out, _ = llama.generate([full], max_gen_len=10, temperature=0, stop_ids=tok.stop_ids)
    assert a2 == tok.decode(out[0])
    session.reset()
    assert session.cached == [] and session.dialog == [{"role": "system", "content": "sys"}]


# ------------------------------------------------------------------------------------------------
# Meta's random stream: the same samples as Meta's generate loop after the same torch.manual_seed
# ------------------------------------------------------------------------------------------------


def meta_generate(model, prompt_tokens, max_gen_len, temperature, top_p, stop_ids, max_seq_len):
    """Meta's published Llama generate loop, re-typed here from its description as the test's oracle.

    Global torch RNG; pad -1; run from the shortest prompt until every row has emitted a stop token or
    total_len; one multinomial draw per step for the whole batch; each row cut at prompt + max_gen_len and
    before its first stop token.
    """
    bsz = len(prompt_tokens)
    min_len, max_len = min(map(len, prompt_tokens)), max(map(len, prompt_tokens))
    total_len = min(max_seq_len, max_gen_len + max_len)
    tokens = torch.full((bsz, total_len), -1, dtype=torch.long)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t)
    eos_reached = torch.tensor([False] * bsz)
    input_text_mask = tokens != -1
    stop = torch.tensor(sorted(stop_ids))
    prev_pos = 0
    model.setup_cache(bsz, total_len)
    for cur_pos in range(min_len, total_len):
        logits = model(tokens[:, prev_pos:cur_pos], prev_pos)
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
            probs_sum = torch.cumsum(probs_sort, dim=-1)
            probs_sort[probs_sum - probs_sort > top_p] = 0.0
            probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
            next_token = torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1))
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        next_token = next_token.reshape(-1)
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stop)
        prev_pos = cur_pos
        if all(eos_reached):
            break
    model.clear_cache()
    out = []
    for i, t in enumerate(tokens.tolist()):
        toks = t[len(prompt_tokens[i]) : len(prompt_tokens[i]) + max_gen_len]
        for s in stop_ids:
            if s in toks:
                toks = toks[: toks.index(s)]
        out.append(toks)
    return out


@pytest.mark.parametrize("temperature,top_p", [(0.0, 0.9), (0.6, 0.9), (1.0, 0.5), (1.3, 0.9)])
def test_generate_reproduces_metas_random_stream(temperature, top_p):
    llama = tiny_llama(seed=3)
    stop = {2, 5}
    prompts = [[1, 10, 11, 12], [1, 20], [1, 30, 31, 32, 33, 34, 35]]  # ragged
    with torch.no_grad():
        torch.manual_seed(1234)
        want = [meta_generate(llama.model, prompts, 24, temperature, top_p, stop, llama.max_seq_len),
                meta_generate(llama.model, prompts[:1], 30, temperature, top_p, stop, llama.max_seq_len)]
    torch.manual_seed(1234)
    got = [llama.generate(prompts, 24, temperature, top_p, stop_ids=stop)[0],
           llama.generate(prompts[:1], 30, temperature, top_p, stop_ids=stop)[0]]  # a second call, same stream
    assert got == want
    if temperature > 0:  # the samples really are random draws: another seed gives another stream
        torch.manual_seed(99)
        assert llama.generate(prompts, 24, temperature, top_p, stop_ids=stop)[0] != want[0]
