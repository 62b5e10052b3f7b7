"""Text generation with Meta's semantics: build, generate, text_completion, chat_completion, chat sessions.

  Llama.build        load any checkpoint + its tokenizer onto a device, in a dtype
  sample_next        temperature, top-k, Meta's top-p, min-p, repetition penalty; greedy at T = 0
  Llama.generate     ragged batches in lockstep from the shortest prompt (longer prompts are teacher-forced),
                     stop sets, logprobs of the generated tokens, echo, a per-token callback for streaming
  ChatSession        a multi-turn chat that keeps its KV cache: a new turn prefills only its new tokens

The KV cache is sized to each request (prompt + new tokens, capped by max_seq_len).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import build_transformer, load_checkpoint
from .errors import LlamaMinError
from .model import KVCache, Transformer


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (argmax)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):  # `not (x >= 0)` also refuses NaN
        if not 0 <= self.temperature < float("inf"):
            raise LlamaMinError(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise LlamaMinError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise LlamaMinError(f"top_k must be an integer >= 1, got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise LlamaMinError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise LlamaMinError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: for tokens already seen, divide positive logits by `penalty`, multiply negative ones.

    logits (B, V); history (B, S) token ids (negative = padding, ignored).
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, history.clamp(min=0), (history >= 0).to(logits.dtype))
    seen = counts > 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_top_p(probs: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Meta's nucleus sampling: keep each token whose cumulative mass *before* it is <= p.

    So the token that crosses p is kept. probs (B, V) -> token ids (B,).
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1) index into sorted
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sample_next(logits: torch.Tensor, s: Sampling, history: Optional[torch.Tensor] = None, generator=None):
    """Choose the next token for each row of logits (B, V) under the sampling settings.

    With the default settings this is Meta's code step for step: argmax at temperature 0, else
    softmax(logits / T), then `sample_top_p`, one multinomial draw for the whole batch from `generator`
    (None = torch's global generator, as Meta's code uses).
    """
    if history is not None:
        logits = apply_repetition_penalty(logits, history, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_k is not None and s.top_k < probs.shape[-1]:
        kth = torch.topk(probs, s.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if s.min_p is not None:
        probs = probs.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if s.top_k is not None or s.min_p is not None:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return sample_top_p(probs, s.top_p, generator)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU that supports it; float32 on the CPU (bf16 does not pay there, see the README)."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class Stats:
    """Timing of the last generate call (seconds, token counts), for tokens/s reports."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    stop_reasons: list = field(default_factory=list)  # per row: why it ended (see STOP_REASONS)
    extra: dict = field(default_factory=dict)


# Why a row ended: a stop token (end of turn / text), its max_gen_len, a stop string, or the window.
STOP_REASONS = ("end of turn", "max-new-tokens", "stop string", "window full")


class Llama:
    def __init__(self, model: Transformer, tokenizer, max_seq_len: int, max_batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.device = model.norm.weight.device
        self.tensor_parallel = getattr(model, "tensor_parallel", None) is not None  # rank 0 decides tokens
        self.stats = Stats()

    @staticmethod
    def build(ckpt_path=None, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None, seed: int = 1, quantize: Optional[str] = None,
              optimize: bool = True, tensor_parallel: bool = False) -> "Llama":
        """Load a checkpoint (Meta dir, HF dir, .gguf, own dir; None = the default model) and its tokenizer.

        seed: `torch.manual_seed(seed)`, as Meta's build does; sampling then draws from torch's global
        generator, so the same seed gives Meta's samples on the same weights.
        quantize: "int8" (see quantize.py). optimize: apply the inference transforms (transforms.py);
        False keeps exactly model.py's classes, the reference computation.
        tensor_parallel: run as one of the processes torchrun started; each reads and holds only its
        slice of the weights (tensor_parallel.py). Call it with the same arguments on every rank.
        """
        from .tokenizer import load_tokenizer
        from .transforms import QUANTIZE_CHOICES, apply_transforms

        if quantize not in (None,) + QUANTIZE_CHOICES:
            raise LlamaMinError(f"unknown quantization '{quantize}' (expected one of {', '.join(QUANTIZE_CHOICES)})")
        if ckpt_path is None:
            from .assets import default_model_path

            ckpt_path = default_model_path()
        device = torch.device(device or default_device())
        dtype = dtype or default_dtype(device)
        torch.manual_seed(seed)
        if tensor_parallel:  # every rank: the same seed, its slice of the weights; rank 0 decides tokens
            from .formats.sliced import load_rank_model
            from .tensor_parallel import build_rank

            tokenizer = []
            def load(rank, world, dev):
                tokenizer.append(load_tokenizer(tokenizer_path or ckpt_path))
                return load_rank_model(ckpt_path, rank, world, dev, dtype, max_seq_len)
            model = build_rank(load, device, optimize=optimize, quantize=quantize)
            return Llama(model, tokenizer[0], max_seq_len, max_batch_size)
        tokenizer = load_tokenizer(tokenizer_path or ckpt_path)
        args, state_dict = load_checkpoint(ckpt_path, dtype=dtype)
        args.max_seq_len = max_seq_len
        model = build_transformer(args, state_dict, device=device).eval().requires_grad_(False)
        del state_dict
        apply_transforms(model, optimize=optimize, quantize=quantize)
        return Llama(model, tokenizer, max_seq_len, max_batch_size)

    def compile(self, mode: Optional[str] = None):
        """torch.compile the model's forward (shapes dynamic: one graph for every position and length).

        The first calls compile for a while (tens of seconds on a CPU); later decode steps run with less
        Python and dispatch overhead per layer.
        """
        self.model.forward = torch.compile(self.model.forward, mode=mode, dynamic=True)
        return self

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every tensor once, the embedding table only as the output."""
        seen, total = set(), 0
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name == "tok_embeddings.weight" or t.data_ptr() in seen:  # one row per token / tied copy
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def _check_request(self, prompt_tokens: list, max_gen_len: Optional[int]) -> int:
        """Validate a generate() request; returns max_gen_len (default: up to the window, as Meta's)."""
        bsz = len(prompt_tokens)
        if not 0 < bsz <= self.max_batch_size:
            raise LlamaMinError(f"batch of {bsz} prompts; max_batch_size is {self.max_batch_size}")
        lens = [len(p) for p in prompt_tokens]
        if min(lens) == 0:
            raise LlamaMinError("empty prompt: give at least one token")
        if max(lens) > self.max_seq_len:
            raise LlamaMinError(f"prompt of {max(lens)} tokens does not fit the window of {self.max_seq_len} tokens")
        vocab = self.model.vocab_size
        for p in prompt_tokens:
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                raise LlamaMinError(f"prompt token ids must be integers in [0, {vocab}): got {p[:8]}...")
        if max_gen_len is None:
            return self.max_seq_len - 1
        if max_gen_len < 0:
            raise LlamaMinError(f"max_gen_len must be >= 0, got {max_gen_len}")
        return max_gen_len

    @torch.inference_mode()
    def generate(self, prompt_tokens: list, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, top_k: Optional[int] = None,
                 min_p: Optional[float] = None, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop_ids=None, on_token: Optional[Callable[[int, int], Optional[bool]]] = None):
        """Generate continuations of token-id prompts -> (tokens per row, logprobs per row or None).

        Meta's loop: rows run in lockstep from the shortest prompt's length; a longer prompt is fed its own
        tokens until it runs out (padding is never embedded); the loop ends when every row has produced a
        stop token or the batch reaches total_len = min(max_seq_len, max_gen_len + longest prompt). Each row
        is then cut to its prompt + max_gen_len and before its first stop token (`stop_ids`, default: the
        tokenizer's). Sampling draws from torch's global generator (`torch.manual_seed(S)` beforehand fixes the
        samples, as with Meta's code) unless `seed` is given, which uses a private generator.
        `on_token(row, id)` is called for each new token that will be part of the row's output (streaming);
        if it returns True the row stops there (how stop strings are matched, see stops.py).
        """
        s = Sampling(temperature, top_p, top_k, min_p, repetition_penalty)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        max_gen_len = self._check_request(prompt_tokens, max_gen_len)
        lens = [len(p) for p in prompt_tokens]
        bsz, total_len = len(lens), min(self.max_seq_len, max_gen_len + max(lens))
        stop = torch.tensor(sorted(self.tokenizer.stop_ids if stop_ids is None else stop_ids), device=self.device)
        pad = -1
        tokens = torch.full((bsz, total_len), pad, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=self.device)
        is_prompt = tokens != pad
        token_logprobs = torch.zeros(bsz, total_len, device=self.device) if logprobs else None
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        row_end = torch.tensor([n + max_gen_len for n in lens], device=self.device)  # output cut per row
        ended = torch.full((bsz,), total_len, device=self.device)  # where a row's output stops
        by_string = torch.zeros(bsz, dtype=torch.bool, device=self.device)

        self.stats = Stats(prompt_tokens=sum(lens))
        start, prev_pos = time.perf_counter(), 0
        self.model.setup_cache(bsz, total_len)
        try:
            for cur_pos in range(min(lens), total_len):
                logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
                history = tokens[:, :cur_pos] if repetition_penalty != 1.0 else None
                next_token = sample_next(logits[:, -1], s, history, generator)
                next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                next_token = _from_rank0(next_token) if self.tensor_parallel else next_token
                tokens[:, cur_pos] = next_token
                if logprobs:  # log p(token t+1 | tokens <= t): position t's logits score the token after it
                    targets = tokens[:, prev_pos + 1 : cur_pos + 1]
                    token_logprobs[:, prev_pos + 1 : cur_pos + 1] = _token_logprobs(logits, targets)
                new = ~is_prompt[:, cur_pos] & ~eos_reached
                stopped = new & torch.isin(next_token, stop)
                ended = torch.where(stopped, cur_pos, ended)
                if on_token is not None:  # stream, and let the callback end rows (stop strings)
                    asked = self._stream(on_token, next_token, new & ~stopped & (cur_pos < row_end))
                    asked = _from_rank0(asked) if self.tensor_parallel else asked
                    ended, by_string = torch.where(asked, cur_pos + 1, ended), by_string | asked
                    stopped |= asked
                eos_reached |= stopped
                if cur_pos == min(lens):
                    self.stats.prefill_s = _elapsed(start, self.device)
                prev_pos = cur_pos
                if eos_reached.all():
                    break
        finally:
            self.model.clear_cache()
        self.stats.decode_s = _elapsed(start, self.device) - self.stats.prefill_s
        return self._collect(tokens, token_logprobs, lens, max_gen_len, echo, ended, by_string)

    @staticmethod
    def _stream(on_token, next_token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Hand each row's new token to the callback; the rows whose callback asked to stop."""
        stop_here = torch.zeros_like(rows)
        for row in torch.nonzero(rows).flatten().tolist():
            if on_token(row, int(next_token[row])):
                stop_here[row] = True
        return stop_here

    def _collect(self, tokens, token_logprobs, lens, max_gen_len, echo, ended, by_string):
        """Cut each row to its generated part (plus the prompt with echo): at most max_gen_len new tokens,
        ending before its stop token (or after the token where a stop string completed)."""
        out_tokens, out_logprobs, reasons = [], [], []
        total_len = tokens.shape[1]
        for i, n in enumerate(lens):
            begin, end = (0 if echo else n), min(int(ended[i]), n + max_gen_len)
            out_tokens.append(tokens[i, begin:end].tolist())
            if token_logprobs is not None:
                out_logprobs.append(token_logprobs[i, begin:end].tolist())
            if by_string[i]:
                reasons.append("stop string")
            elif int(ended[i]) < n + max_gen_len:
                reasons.append("end of turn")
            else:
                reasons.append("max-new-tokens" if n + max_gen_len <= total_len else "window full")
            self.stats.new_tokens += max(0, end - n)
        self.stats.stop_reasons = reasons
        return out_tokens, (out_logprobs if token_logprobs is not None else None)

    def text_completion(self, prompts: list, temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, **extras):
        """Complete plain-text prompts -> [{"generation": str, "tokens": [...], "logprobs": [...]}, ...]."""
        tok = self.tokenizer
        prompt_tokens = [tok.encode(p, bos=tok.add_bos, eos=False) for p in prompts]
        out, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, **extras)
        results = []
        for i, row in enumerate(out):
            r = {"generation": tok.decode(row)}
            if logprobs:
                r.update(tokens=[tok.decode([t]) for t in row], logprobs=lps[i])
            results.append(r)
        return results

    def chat_completion(self, dialogs: list, temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, **extras):
        """Answer dialogs ([{"role", "content"}, ...] ending with a user turn) in the tokenizer's chat format."""
        prompt_tokens = [self.tokenizer.encode_dialog(d) for d in dialogs]
        out, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **extras)
        results = []
        for i, row in enumerate(out):
            r = {"generation": {"role": "assistant", "content": self.tokenizer.decode(row)}}
            if logprobs:
                r.update(tokens=[self.tokenizer.decode([t]) for t in row], logprobs=lps[i])
            results.append(r)
        return results



def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: logits (B, T, V), targets (B, T) -> (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Under tensor parallelism rank 0's choice wins on every rank (tensor_parallel.py)."""
    from .tensor_parallel import broadcast_from_rank0

    return broadcast_from_rank0(t)


def _elapsed(start: float, device) -> float:
    """Seconds since `start`, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class ChatSession:
    """A multi-turn chat (batch 1) that keeps its KV cache between turns.

    Each turn encodes the whole dialog, finds how much of it is already in the cache (the longest
    common prefix with the tokens fed so far) and prefills only the rest, then decodes until a stop
    token. `reset()` forgets the dialog (the system message stays).
    """

    def __init__(self, llama: Llama, system: Optional[str] = None, seed: Optional[int] = None, **sampling):
        self.llama, self.system = llama, system
        self.sampling = Sampling(**sampling)
        self.generator = None if seed is None else torch.Generator(llama.device).manual_seed(seed)
        self.reset()

    def reset(self):
        self.dialog = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list = []  # token ids whose keys/values sit in the cache, in order
        self.llama.model.clear_cache()

    def _ensure_cache(self, needed: int):
        """Grow the cache (doubling, capped by the window), keeping the positions it holds."""
        model = self.llama.model
        have = model.cache_len
        if needed <= have:
            return
        size = min(self.llama.max_seq_len, max(needed, 2 * have, 256))
        if not have:
            model.setup_cache(1, size)
            return
        for layer in model.layers:  # a bigger cache holding the same positions
            old = layer.attention.cache
            layer.attention.cache = KVCache(1, size, *old.k.shape[2:], old.k.dtype, old.k.device)
            layer.attention.cache.update(0, old.k, old.v)

    @torch.inference_mode()
    def ask(self, text: str, max_gen_len: int = 512, on_token: Optional[Callable[[int], None]] = None) -> str:
        llama, tok = self.llama, self.llama.tokenizer
        dialog = self.dialog + [{"role": "user", "content": text}]
        ids = tok.encode_dialog(dialog)
        if len(ids) >= llama.max_seq_len:
            raise LlamaMinError(f"the dialog is {len(ids)} tokens, the window {llama.max_seq_len}: /reset to start over")
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        total = min(llama.max_seq_len, len(ids) + max_gen_len)
        self._ensure_cache(total)
        llama.stats = Stats(prompt_tokens=len(ids) - keep)
        start = time.perf_counter()
        logits = llama.model(torch.tensor([ids[keep:]], device=llama.device), keep, last_only=True)
        llama.stats.prefill_s = _elapsed(start, llama.device)
        fed, reply = list(ids), []
        while len(fed) < total:
            history = torch.tensor([fed], device=llama.device) if self.sampling.repetition_penalty != 1 else None
            nxt = sample_next(logits[:, -1], self.sampling, history, self.generator)
            nxt = int((_from_rank0(nxt) if llama.tensor_parallel else nxt)[0])
            if nxt in tok.stop_ids:
                break
            reply.append(nxt)
            if on_token is not None:
                on_token(nxt)
            logits = llama.model(torch.tensor([[nxt]], device=llama.device), len(fed), last_only=True)
            fed.append(nxt)
        llama.stats.new_tokens = len(reply)
        llama.stats.decode_s = _elapsed(start, llama.device) - llama.stats.prefill_s
        self.cached = fed
        answer = tok.decode(reply)
        self.dialog = dialog + [{"role": "assistant", "content": answer}]
        return answer
