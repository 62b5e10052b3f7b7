"""Speculative decoding (speculative.py): greedy output equals plain greedy decoding token for token, and the
accept/reject rule emits tokens distributed as the target's distribution."""

import copy

import pytest
import torch

from _tiny import tiny_model
from llama_min.errors import LlamaMinError
from llama_min.generation import Llama, Sampling, sample_next
from llama_min.decoding.speculative import residual, sampling_probs, verify_greedy, verify_sampled
from test_generation import CharTokenizer


def llama(model, max_seq_len=128):
    return Llama(model, CharTokenizer(), max_seq_len=max_seq_len, max_batch_size=2)


def perturbed(model, noise, seed=5):
    """A copy of `model` with N(0, noise) added to every matrix: a draft that agrees often, not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.ndim == 2:
                p.add_(noise * torch.randn(p.shape, generator=g))
    return draft


PROMPT = [1, 40, 41, 42, 43, 44, 45]


# ------------------------------------------------------------------------------------------------
# The accept/reject rule on fixed distributions
# ------------------------------------------------------------------------------------------------


def test_residual_worked_example():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.1, 0.2])
    # max(0, p - q) = [0.3, 0, 0.1, 0], total 0.4
    torch.testing.assert_close(residual(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual(p, p), p)  # nothing to correct: never used, but well defined


def test_verify_greedy_worked_example():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 9]) == (2, 7)  # third proposal is not the argmax: take 7
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == (3, 8)  # all accepted: the bonus token
    assert verify_greedy([4, 6], [5]) == (0, 4)


def test_sampled_rule_emits_the_targets_distribution():
    """Draft proposals x_i ~ q_i, target distributions p_i fixed (a target whose next-token distribution does
    not depend on the context): the first emitted token must follow p_1, the second p_2 (whatever the first),
    although the proposals follow q. Exact probabilities vs frequencies of 10000 rounds (std <= 0.005; the
    second token: ~4500 rounds, std <= 0.0075): bounds at 4 std."""
    p = torch.tensor([[0.60, 0.25, 0.10, 0.05, 0.00],
                      [0.05, 0.05, 0.10, 0.30, 0.50],
                      [0.20, 0.20, 0.20, 0.20, 0.20]])
    q = torch.tensor([[0.10, 0.20, 0.30, 0.20, 0.20],
                      [0.50, 0.20, 0.10, 0.10, 0.10]])
    g = torch.Generator().manual_seed(0)
    n, first, second, n_second = 10000, torch.zeros(5), torch.zeros(5), 0
    proposals = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(2)], 1)
    for proposal in proposals.tolist():
        m, y = verify_sampled(p, q, proposal, g)
        emitted = proposal[:m] + [y]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
            n_second += 1
    assert (first / n - p[0]).abs().max() < 0.02, first / n
    assert n_second > 4000  # P(x_1 accepted) = sum min(p, q) = 0.45
    assert (second / n_second - p[1]).abs().max() < 0.03, second / n_second
    assert (first / n - q[0]).abs().max() > 0.3  # the draft's own distribution would fail the check


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_p=0.9), dict(temperature=1.2, top_p=1.0, top_k=5),
                                      dict(temperature=0.7, top_p=0.95, min_p=0.1)])
def test_sampling_probs_is_what_sample_next_draws_from(settings):
    """sampling_probs gives the distribution of sample_next's draws (support and frequencies, 20000 draws)."""
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(3)) * 2
    s = Sampling(**settings)
    probs = sampling_probs(logits, s)[0]
    torch.manual_seed(0)
    draws = sample_next(logits.expand(20000, 16), s)
    freq = torch.bincount(draws, minlength=16).float() / 20000
    assert torch.all(freq[probs == 0] == 0)
    assert (freq - probs).abs().max() < 0.015
    assert abs(float(probs.sum()) - 1) < 1e-5 and (probs == 0).any()


# ------------------------------------------------------------------------------------------------
# Whole generations on tiny models
# ------------------------------------------------------------------------------------------------


def plain(target, **kw):
    return target.generate([PROMPT], max_gen_len=40, temperature=0, **kw)


@pytest.mark.parametrize("draft_kind", ["other weights", "perturbed", "same weights"])
def test_greedy_speculative_equals_plain_greedy(draft_kind):
    model = tiny_model(scale=0.3)
    draft = {"other weights": lambda: tiny_model(seed=7, scale=0.3), "perturbed": lambda: perturbed(model, 0.01),
             "same weights": lambda: copy.deepcopy(model)}[draft_kind]()
    target, drafter = llama(model), llama(draft)
    want, _ = plain(target, stop_ids=set())
    assert len(want[0]) == 40
    for k in (1, 3, 6):
        got, _ = target.generate([PROMPT], max_gen_len=40, temperature=0, stop_ids=set(), draft=drafter, draft_tokens=k)
        assert got == want, (draft_kind, k)
        extra = target.stats.extra
        assert target.stats.new_tokens == 40 and extra["draft_tokens"] == k and "effective_tok_s" in extra
        rate = extra["acceptance_rate"]
        if draft_kind == "same weights":
            assert rate == 1.0 and extra["target_passes"] <= -(-40 // (k + 1)) + 1
        elif draft_kind == "perturbed":
            assert 0.2 < rate < 1.0, rate


def test_speculative_on_the_transformed_model_with_stops_logprobs_echo():
    """The optimized model (fused projections) as target; stop token, stop callback, logprobs and echo as in
    plain generate."""
    from llama_min.runtime.transforms import apply_transforms

    target = llama(apply_transforms(tiny_model(scale=0.3)))
    drafter = llama(perturbed(tiny_model(scale=0.3), 0.01))
    want, want_lp = target.generate([PROMPT], max_gen_len=30, temperature=0, stop_ids=set(), logprobs=True, echo=True)
    got, got_lp = target.generate([PROMPT], max_gen_len=30, temperature=0, stop_ids=set(), logprobs=True, echo=True,
                                  draft=drafter, draft_tokens=4)
    assert got == want
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4, rtol=1e-4)

    stop = want[0][len(PROMPT) + 12]  # a token the greedy run produces: both runs end before it
    want, _ = plain(target, stop_ids={stop})
    got, _ = target.generate([PROMPT], max_gen_len=40, temperature=0, stop_ids={stop}, draft=drafter)
    assert got == want and len(got[0]) <= 12 and target.stats.stop_reasons == ["end of turn"]

    seen = []
    got, _ = target.generate([PROMPT], max_gen_len=40, temperature=0, stop_ids=set(), draft=drafter,
                             on_token=lambda row, t: seen.append(t) or len(seen) == 9)
    assert got[0] == seen and len(seen) == 9 and target.stats.stop_reasons == ["stop string"]


def test_speculative_with_stop_strings_and_streamed_text():
    """Stop strings (matched on the text) and on_text streaming work through the draft path as without it."""
    target = llama(tiny_model(scale=0.3))
    drafter = llama(perturbed(tiny_model(scale=0.3), 0.01))
    full, _ = plain(target, stop_ids=set())
    text = CharTokenizer().decode(full[0])
    stop = text[15:17]  # two characters the greedy text contains
    runs = []
    for draft in (None, drafter):
        shown = []
        out, _ = target.generate([PROMPT], max_gen_len=40, temperature=0, stop_ids=set(), stop=[stop],
                                 on_text=lambda row, t: shown.append(t), draft=draft, draft_tokens=3)
        runs.append((out, "".join(shown), target.stats.stop_reasons))
    assert runs[0] == runs[1]
    assert runs[1][2] == ["stop string"] and stop not in runs[1][1] and len(runs[1][0][0]) <= 17


def test_sampled_speculative_runs_and_is_reproducible():
    target, drafter = llama(tiny_model(scale=0.3)), llama(perturbed(tiny_model(scale=0.3), 0.01))
    runs = [target.generate([PROMPT], max_gen_len=30, temperature=0.9, top_p=0.95, seed=11, stop_ids=set(),
                            draft=drafter, draft_tokens=3)[0] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0][0]) == 30
    assert 0 < target.stats.extra["acceptance_rate"] <= 1


def test_bad_requests():
    target = llama(tiny_model())
    with pytest.raises(LlamaMinError, match="one prompt"):
        target.generate([PROMPT, PROMPT], max_gen_len=4, draft=llama(tiny_model(seed=3)))
    with pytest.raises(LlamaMinError, match="draft-tokens"):
        target.generate([PROMPT], max_gen_len=4, draft=llama(tiny_model(seed=3)), draft_tokens=0)
    with pytest.raises(LlamaMinError, match="vocabulary"):
        target.generate([PROMPT], max_gen_len=4, draft=llama(tiny_model(seed=3, vocab_size=96)))


# ------------------------------------------------------------------------------------------------
# The default model with its own int8 copy as the draft
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_int8_self_draft_same_greedy_tokens(smollm2, smollm2_path):
    draft = Llama.build(smollm2_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype=torch.float32,
                        quantize="int8")
    tok = smollm2.tokenizer
    prompt = tok.encode("The three primary colors are", bos=tok.add_bos, eos=False)
    want, _ = smollm2.generate([prompt], max_gen_len=24, temperature=0, stop_ids=set())
    got, _ = smollm2.generate([prompt], max_gen_len=24, temperature=0, stop_ids=set(), draft=draft, draft_tokens=4)
    assert got == want
    assert 0.3 < smollm2.stats.extra["acceptance_rate"] <= 1.0  # int8 agrees with float32 most of the time
