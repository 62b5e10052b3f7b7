"""ChatSession: cache reuse across turns, growth past the first allocation, undo, system changes, Ctrl-C."""

import json

import pytest
import torch

from llama_min.decoding.session import ChatSession
from test_generation import tiny_llama


def fresh_answer(llama, dialog, max_gen_len):
    """The greedy answer to a dialog computed from scratch (no cache reuse) with generate()."""
    ids = llama.tokenizer.encode_dialog(dialog)
    out, _ = llama.generate([ids], max_gen_len, temperature=0)
    return llama.tokenizer.decode(out[0])


def test_cache_grows_past_its_first_allocation_and_answers_stay_exact():
    llama = tiny_llama(seed=8, max_seq_len=700, batch=1)
    chat = ChatSession(llama, temperature=0)
    sizes, caches, dialogs = [], [], []
    for turn in range(6):
        chat.ask(f"question number {turn} " * 3, max_gen_len=12)  # ~80 tokens a turn: passes 256 soon
        sizes.append(llama.model.cache_len)
        caches.append(llama.model.layers[0].attention.cache)
        dialogs.append(chat.dialog)
    assert sizes[0] == 256 and max(sizes) > 256  # grown (doubling)...
    assert len(set(map(id, caches))) == 2  # ...once, and otherwise reused
    for dialog in dialogs:  # every answer equals a from-scratch greedy answer
        assert dialog[-1]["content"] == fresh_answer(llama, dialog[:-1], 12)


def test_generate_between_turns_does_not_corrupt_the_session():
    """generate() sets up and clears its own cache on the shared model; the session notices and re-prefills."""
    llama = tiny_llama(seed=11, batch=1)
    chat = ChatSession(llama, temperature=0)
    chat.ask("hi", max_gen_len=6)
    llama.generate([[1, 5, 6]], 4, temperature=0)
    assert chat.ask("more", max_gen_len=6) == fresh_answer(llama, chat.dialog[:-1], 6)


def test_undo_and_system_change_keep_answers_exact():
    llama = tiny_llama(seed=9, batch=1)
    chat = ChatSession(llama, temperature=0)
    first = chat.ask("hi", max_gen_len=6)
    chat.ask("more", max_gen_len=6)
    assert chat.undo() and [m["content"] for m in chat.dialog] == ["hi", first]
    assert chat.ask("other", max_gen_len=6) == fresh_answer(llama, chat.dialog[:-1], 6)
    chat.set_system("be brief")
    assert chat.dialog[0] == {"role": "system", "content": "be brief"}
    assert chat.ask("again", max_gen_len=6) == fresh_answer(llama, chat.dialog[:-1], 6)
    chat.reset()
    assert chat.dialog == [{"role": "system", "content": "be brief"}]
    assert not ChatSession(llama).undo()


def test_interrupted_answer_is_kept_and_the_next_turn_is_exact(tmp_path):
    llama = tiny_llama(seed=10, batch=1)
    chat = ChatSession(llama, temperature=0)
    seen = []

    def stop_after_three(token_id):
        seen.append(token_id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.ask("tell me", max_gen_len=20, on_token=stop_after_three)
    assert chat.dialog[-1] == {"role": "assistant", "content": llama.tokenizer.decode(seen)}
    assert chat.ask("go on", max_gen_len=8) == fresh_answer(llama, chat.dialog[:-1], 8)
    chat.save(tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text()) == chat.dialog
    assert torch.is_grad_enabled()
