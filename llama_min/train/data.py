"""Training data: read .txt / .jsonl files, tokenize, pack into fixed windows, batch deterministically.

  read_records        .txt -> one text document; .jsonl -> {"text": ...} or {"messages": [...]} per line,
                      with errors that name the file and line (bad UTF-8, broken JSON, wrong fields)
  encode_records      documents -> one token stream + a loss mask (chat: assistant tokens only)
  train_sentencepiece a Llama-style BPE tokenizer (byte fallback) trained on the data itself
  PackedData          the stream cut into windows of seq_len+1 tokens, split into train / val windows
  BatchOrder          which windows each step reads: a fresh permutation per epoch from (seed, epoch), so
                      the data position is just "samples consumed" and a resumed run reads the same batches

Packing: documents are concatenated (BOS text EOS, BOS text EOS, ...) and cut into windows of
`seq_len + 1` tokens that overlap by one token; window i gives inputs `w[:-1]` and targets `w[1:]`.
Attention is causal over the whole window, across document boundaries, as usual for packed training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LlamaMinError

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------- reading


def read_text(path: Path) -> str:
    """The file's text, decoded as strict UTF-8; a bad byte is reported with its line number."""
    path = Path(path)
    if not path.exists():
        raise LlamaMinError(f"{path}: no such file")
    if not path.is_file():
        raise LlamaMinError(f"{path}: not a file (expected a .txt or .jsonl file)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LlamaMinError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8") from None
    if not text.strip():
        raise LlamaMinError(f"{path}: empty file (no text to train on)")
    return text.removeprefix("\ufeff")


def read_records(path) -> list[dict]:
    """Documents of one data file: `{"text": str}` or `{"messages": [...]}` dicts.

    A `.jsonl` file holds one JSON object per line (blank lines are skipped); any other file is plain text
    and becomes a single document.
    """
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() != ".jsonl":
        return [{"text": text}]
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaMinError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        records.append(_check_record(rec, f"{path}:{n}"))
    if not records:
        raise LlamaMinError(f"{path}: no records (expected one JSON object per line)")
    return records


def _check_record(rec, where: str) -> dict:
    """A jsonl record must be {"text": str} or {"messages": [{"role", "content"}, ...] with an assistant}."""
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return {"text": rec["text"], "where": where}
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise LlamaMinError(f'{where}: expected a JSON object with "text" (a string) or "messages" (a list)')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise LlamaMinError(f'{where}: message {i} must be {{"role": "system"|"user"|"assistant", '
                             f'"content": "..."}}, got {json.dumps(m)[:80]}')
    if not any(m["role"] == "assistant" for m in msgs):
        raise LlamaMinError(f"{where}: chat record has no assistant message (nothing to train on)")
    return {"messages": msgs, "where": where}


# ------------------------------------------------------------------------------------------- tokenizing


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """BOS text EOS (BOS unless the vocabulary is ChatML-style, which uses none); loss on all but BOS."""
    bos = tok.add_bos  # the tokenizer decides (never for ChatML, never without a BOS id)
    ids = tok.encode(text, bos=bos, eos=tok.eos_id >= 0)
    return ids, [0] * bos + [1] * (len(ids) - bos)


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of a dialog in the tokenizer's chat format, with mask 1 on assistant tokens only.

    Built turn by turn with `encode_dialog` (the prompt up to the first reply) and `encode_followup`
    (closing a reply, the next messages, the next open assistant turn). A reply's tokens and the tokens
    that close it (Llama 3 `<|eot_id|>`, ChatML `<|im_end|>` "\\n", Llama 2 " " EOS) are learned, so the
    model learns to stop; system/user text and headers are context only.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]  # text after the last reply would not be learned
    ids, mask = [], []
    prev = None  # index of the previous assistant reply
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if prev is None:
            prompt = tok.encode_dialog(messages[:i])
        else:
            close = tok.encode_followup([], open_assistant=False)
            prompt = tok.encode_followup(messages[prev + 1 : i])
            ids += close
            mask += [1] * len(close)
            prompt = prompt[len(close):]
        reply = tok.encode(m["content"] if tok.chat_format == "chatml" else m["content"].strip())
        ids += prompt + reply
        mask += [0] * len(prompt) + [1] * len(reply)
        prev = i
    close = tok.encode_followup([], open_assistant=False)
    return ids + close, mask + [1] * len(close)


def encode_records(tok, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one packed stream: (ids int64 (N,), loss mask bool (N,))."""
    all_ids, all_mask = [], []
    for rec in records:
        if "text" in rec:
            ids, mask = encode_text(tok, rec["text"])
        else:
            try:
                ids, mask = encode_chat(tok, rec["messages"])
            except ValueError as e:
                raise LlamaMinError(f"{rec.get('where', 'chat record')}: {e}") from None
        all_ids += ids
        all_mask += mask
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_mask, dtype=torch.bool)


def train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    """A Llama-style sentencepiece BPE model trained on `texts`: the serialized model (bytes).

    Like Llama 1/2's tokenizer: BPE, byte fallback (any UTF-8 text encodes), digits split, no text
    normalisation, unk 0 / BOS 1 / EOS 2, no pad. Newlines are not in the training lines, so they encode
    as the byte piece <0x0A>, as in Llama. If the text is too small for `vocab_size` pieces the vocabulary
    comes out smaller (the model keeps its embedding rows; the unused ones are never trained).
    """
    import io

    import sentencepiece as spm

    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    if not lines:
        raise LlamaMinError("no text to train a tokenizer on")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, character_coverage=0.9995,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- packing


@dataclass
class PackedData:
    """A token stream cut into windows of `seq_len + 1` tokens; the last `n_val` windows are validation."""

    ids: torch.Tensor   # (N,) int64
    mask: torch.Tensor  # (N,) bool: token is a training target
    seq_len: int
    n_val: int

    @classmethod
    def build(cls, ids, mask, seq_len: int, val_fraction: float, source: str = "data") -> "PackedData":
        n = (len(ids) - 1) // seq_len
        if n < 1:
            raise LlamaMinError(f"{source}: only {len(ids)} tokens, too few for one window of seq_len+1 = "
                             f"{seq_len + 1}; lower --seq-len or add text")
        n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 else 0
        data = cls(ids, mask, seq_len, n_val)
        if not any(data.window(i)[2].any() for i in range(data.n_train)):
            raise LlamaMinError(f"{source}: no training targets (chat records need assistant text)")
        return data

    @property
    def n_windows(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    @property
    def n_train(self) -> int:
        return self.n_windows - self.n_val

    def window(self, i: int):
        """(inputs (T,), targets (T,), loss mask (T,)) of window i (train windows first, then val)."""
        s = i * self.seq_len
        w, m = self.ids[s : s + self.seq_len + 1], self.mask[s : s + self.seq_len + 1]
        return w[:-1], w[1:], m[1:]

    def batch(self, indices):
        """Stacked windows: (x (B,T), y (B,T), mask (B,T))."""
        parts = [self.window(i) for i in indices]
        return tuple(torch.stack(p) for p in zip(*parts))

    def val_indices(self) -> list[int]:
        return list(range(self.n_train, self.n_windows))


class BatchOrder:
    """Sample k of the training stream is window perm(epoch)[k % n] with epoch = k // n.

    The permutation of each epoch comes from a generator seeded with (seed, epoch), so the order is a
    pure function of the sample counter: a run resumed at sample k reads exactly what it would have.
    """

    def __init__(self, n_train: int, seed: int):
        self.n, self.seed = n_train, seed
        self._perms: dict[int, list[int]] = {}

    def perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Window indices of samples start .. start+count-1."""
        return [self.perm(k // self.n)[k % self.n] for k in range(start, start + count)]
