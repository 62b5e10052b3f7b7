"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers' own GGUF loader.

transformers reads the GGUF itself (its own dequantization and q/k permutation), so it is an
independent oracle for our GGUF path, model and generation loop.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.assets, pytest.mark.filterwarnings("ignore")]
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time, there was a little", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def gguf_path(smollm2_path):
    return smollm2_path


@pytest.fixture(scope="module")
def ours(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                            dtype=torch.float32).eval()


def test_args_from_gguf(ours):
    a = ours.model.params
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.hd, a.ffn_hidden, a.vocab_size) == (576, 30, 9, 3, 64, 1536, 49152)
    assert (a.rope_theta, a.norm_eps, a.tie_word_embeddings) == (100000.0, 1e-5, True)


def test_logits_match_transformers(ours, hf_model):
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        diff = (ours.model(ids) - hf_model(ids).logits).abs().max().item()
    print(f"[smollm2] max|dlogits| vs transformers GGUF load: {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.slow
def test_greedy_generation_matches_transformers_token_for_token(ours, hf_model):
    tok = ours.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    got, _ = ours.generate(prompts, max_gen_len=32, temperature=0, stop_ids=set())
    for prompt, row in zip(prompts, got):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert row == ref, f"{tok.decode(row)!r} != {tok.decode(ref)!r}"
    assert tok.decode(got[0]).startswith(" girl named")
    assert "Paris" in tok.decode(got[1])


def test_chat_answer(ours):
    res = ours.chat_completion([[{"role": "user", "content": "What is the capital of France?"}]],
                               temperature=0, max_gen_len=30)
    assert "Paris" in res[0]["generation"]["content"]


def run_script(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_script_completion(gguf_path):
    r = run_script("--ckpt", str(gguf_path), "--prompt", "The capital of France is", "--temperature", "0",
                   "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "tok/s" in r.stderr and "tok/s" not in r.stdout


@pytest.mark.slow
def test_generate_script_chat_two_turns_piped(gguf_path):
    r = run_script("--ckpt", str(gguf_path), "--chat", "--temperature", "0", "--max-new-tokens", "30",
                   stdin="What is the capital of France?\nWhat is the capital of Germany?\n")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2 and "Paris" in lines[0] and "Berlin" in r.stdout


def test_generate_script_prompt_longer_than_window(gguf_path):
    r = run_script("--ckpt", str(gguf_path), "--prompt", "word " * 400, "--max-seq-len", "64")
    assert r.returncode == 2
    loading, error = r.stderr.strip().splitlines()  # what it loaded, then the one error line
    assert loading.startswith("loading ") and error.startswith("error: ") and "does not fit the window of 64" in error


def test_assistant_prefill_continues_the_answer(smollm2):
    """A dialog ending with an assistant message is continued (chat_completion, ChatSession, template path)."""
    from llama_min.decoding.session import ChatSession

    question = {"role": "user", "content": "What is the capital of France?"}
    dialog = [question, {"role": "assistant", "content": "The capital of France is"}]
    ids = smollm2.tokenizer.encode_dialog(dialog, continue_final_message=True)
    assert smollm2.tokenizer.decode(ids).endswith("<|im_start|>assistant\nThe capital of France is")
    out = smollm2.chat_completion([dialog], temperature=0, max_gen_len=8)[0]["generation"]["content"]
    assert "Paris" in out and not out.startswith("The capital")
    chat = ChatSession(smollm2, temperature=0)
    answer = chat.ask(question["content"], max_gen_len=8, prefill="The capital of France is")
    assert answer == "The capital of France is" + out
