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
from .model import Transformer


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (argmax)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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
    """Choose the next token for each row of logits (B, V) under the sampling settings."""
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
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return sample_top_p(probs, s.top_p, generator)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU that supports it; float32 on the CPU (bf16 does not pay there, see the README)."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def optimize_for_inference(model: Transformer, quantize: Optional[str] = None, cpu_layout: bool = True):
    """int8/int4 weights (quantize="int8"/"int4"), or float32 CPU weights of wide layers stored transposed (fast.py)."""
    weight = model.norm.weight
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize)
    elif cpu_layout and weight.device.type == "cpu" and weight.dtype == torch.float32:
        from .fast import transpose_wide_layers

        transpose_wide_layers(model)
    return model


@dataclass
class Stats:
    """Timing of the last generate call (seconds, token counts), for tokens/s reports."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)


class Llama:
    def __init__(self, model: Transformer, tokenizer, max_seq_len: int, max_batch_size: int, seed: int = 1):
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.device = model.norm.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = Stats()

    @staticmethod
    def build(ckpt_path=None, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None, seed: int = 1, quantize: Optional[str] = None,
              cpu_layout: bool = True, packed: Optional[bool] = None) -> "Llama":
        """Load a checkpoint (Meta dir, HF dir, .gguf, own dir; None = the default model) and its tokenizer.

        quantize="int8" stores every linear layer as int8 with per-channel scales, "int4" (or "int4-64",
        "int4-128") as 4-bit codes with a scale and zero per group of 32 (64, 128) weights (see quantize.py).
        packed: run a quantized GGUF at its own precision (formats/gguf_packed.py); None = yes when the file
        is a quantized GGUF and neither dtype nor quantize is given; False = dequantize to float as before.
        cpu_layout: in float32 on the CPU, store wide layers transposed for faster decoding (see fast.py).
        """
        from .formats.gguf_packed import load_gguf_packed, use_packed
        from .quantize import parse_quantize
        from .tokenizer import load_tokenizer

        parse_quantize(quantize)  # a bad spec fails before loading
        if ckpt_path is None:
            from .assets import default_model_path

            ckpt_path = default_model_path()
        packed = use_packed(ckpt_path, packed, dtype, quantize)
        device = torch.device(device or default_device())
        dtype = dtype or default_dtype(device)
        torch.manual_seed(seed)
        tokenizer = load_tokenizer(tokenizer_path or ckpt_path)
        if packed:  # a quantized GGUF at its own precision: built directly from the file's blocks
            model = load_gguf_packed(ckpt_path, device, dtype, max_seq_len)
            if tokenizer.n_words > model.vocab_size:
                raise ValueError(f"{ckpt_path}: tokenizer has {tokenizer.n_words} tokens, model only {model.vocab_size}")
            return Llama(model, tokenizer, max_seq_len, max_batch_size, seed)
        args, state_dict = load_checkpoint(ckpt_path, dtype=dtype)
        if tokenizer.n_words > args.vocab_size:
            raise ValueError(f"{ckpt_path}: tokenizer has {tokenizer.n_words} tokens, model only {args.vocab_size}")
        args.max_seq_len = max_seq_len
        model = build_transformer(args, state_dict, device=device).eval().requires_grad_(False)
        del state_dict
        optimize_for_inference(model, quantize, cpu_layout)
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed)

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
            if name.startswith("tok_embeddings.") or t.data_ptr() in seen:  # one row per token / tied copy
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def generate(self, prompt_tokens: list, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, top_k: Optional[int] = None,
                 min_p: Optional[float] = None, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop_ids=None, on_token: Optional[Callable[[int, int], None]] = None):
        """Generate continuations of token-id prompts -> (tokens per row, logprobs per row or None).

        Rows run in lockstep from the shortest prompt; a longer prompt is fed its own tokens until it runs
        out, so padding is never embedded. A row stops at a token in `stop_ids` (default: the tokenizer's),
        which is not returned. `on_token(row, id)` is called for every new token as it is generated.
        """
        s = Sampling(temperature, top_p, top_k, min_p, repetition_penalty)
        if seed is not None:
            self.generator.manual_seed(seed)
        bsz = len(prompt_tokens)
        if not 0 < bsz <= self.max_batch_size:
            raise ValueError(f"batch of {bsz} prompts; max_batch_size is {self.max_batch_size}")
        lens = [len(p) for p in prompt_tokens]
        if min(lens) == 0:
            raise ValueError("empty prompt: give at least one token")
        if max(lens) >= self.max_seq_len:
            raise ValueError(f"prompt of {max(lens)} tokens does not fit the window of {self.max_seq_len} "
                             "tokens (leave room for at least one new token)")
        max_gen_len = self.max_seq_len - 1 if max_gen_len is None else max_gen_len
        total_len = min(self.max_seq_len, max_gen_len + max(lens))
        stop = torch.tensor(sorted(self.tokenizer.stop_ids if stop_ids is None else stop_ids), device=self.device)

        pad = -1
        tokens = torch.full((bsz, total_len), pad, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.tensor(p[:total_len], dtype=torch.long, device=self.device)
        is_prompt = tokens != pad
        token_logprobs = torch.zeros(bsz, total_len, device=self.device) if logprobs else None
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        limit = torch.tensor(lens, device=self.device) + max_gen_len  # each row's own end

        self.model.setup_cache(bsz, total_len)
        self.stats = Stats(prompt_tokens=sum(lens))
        start = time.perf_counter()
        prev_pos = 0
        for cur_pos in range(min(lens), total_len):
            logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            history = tokens[:, :cur_pos] if repetition_penalty != 1.0 else None
            next_token = sample_next(logits[:, -1], s, history, self.generator)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:  # log p(token t+1 | tokens <= t): logits of position t score the token after it
                targets = tokens[:, prev_pos + 1 : cur_pos + 1, None]
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = (
                    torch.log_softmax(logits, dim=-1).gather(-1, targets)[..., 0])
            generated = ~is_prompt[:, cur_pos]
            stopped = generated & torch.isin(next_token, stop)
            if on_token is not None:  # stream the new tokens (a stop token is not part of the text)
                for row in torch.nonzero(generated & ~done & ~stopped).flatten().tolist():
                    on_token(row, int(next_token[row]))
            done |= stopped | (cur_pos + 1 >= limit)
            if cur_pos == min(lens):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.stats.prefill_s = time.perf_counter() - start
            prev_pos = cur_pos
            if done.all():
                break
        self.stats.decode_s = time.perf_counter() - start - self.stats.prefill_s
        self.model.clear_cache()
        return self._collect(tokens, token_logprobs, lens, max_gen_len, echo, stop)

    def _collect(self, tokens, token_logprobs, lens, max_gen_len, echo, stop):
        """Cut each row to its generated part (plus the prompt with echo), ending before the first stop."""
        out_tokens, out_logprobs = [], []
        stop_set = set(stop.tolist())
        for i, n in enumerate(lens):
            begin = 0 if echo else n
            row = tokens[i, begin : n + max_gen_len].tolist()
            probs = token_logprobs[i, begin : n + max_gen_len].tolist() if token_logprobs is not None else None
            if -1 in row:  # generation ended early: the rest was never filled
                cut = row.index(-1)
                row, probs = row[:cut], probs[:cut] if probs is not None else None
            for j, t in enumerate(row):
                if j + begin >= n and t in stop_set:
                    row, probs = row[:j], probs[:j] if probs is not None else None
                    break
            self.stats.new_tokens += max(0, len(row) - (n - begin))
            out_tokens.append(row)
            out_logprobs.append(probs)
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


class ChatSession:
    """A multi-turn chat (batch 1) that keeps its KV cache between turns.

    Each turn encodes the whole dialog, finds how much of it is already in the cache (the longest
    common prefix with the tokens fed so far) and prefills only the rest, then decodes until a stop
    token. `reset()` forgets the dialog (the system message stays).
    """

    def __init__(self, llama: Llama, system: Optional[str] = None, **sampling):
        self.llama, self.system = llama, system
        self.sampling = Sampling(**sampling)
        self.reset()

    def reset(self):
        self.dialog = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list = []  # token ids whose keys/values sit in the cache, in order
        self.llama.model.clear_cache()

    def _ensure_cache(self, needed: int):
        """Grow the cache (doubling, capped by the window) keeping what it holds."""
        model = self.llama.model
        have = model.cache_len
        if needed <= have:
            return
        size = min(self.llama.max_seq_len, max(needed, 2 * have, 256))
        old = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
        model.setup_cache(1, size)
        if have:
            for layer, (k, v) in zip(model.layers, old):
                layer.attention.cache_k[:, :have] = k
                layer.attention.cache_v[:, :have] = v

    @torch.inference_mode()
    def ask(self, text: str, max_gen_len: int = 512, on_token: Optional[Callable[[int], None]] = None) -> str:
        llama, tok = self.llama, self.llama.tokenizer
        dialog = self.dialog + [{"role": "user", "content": text}]
        ids = tok.encode_dialog(dialog)
        if len(ids) >= llama.max_seq_len:
            raise ValueError(f"the dialog is {len(ids)} tokens, the window {llama.max_seq_len}: /reset to start over")
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        total = min(llama.max_seq_len, len(ids) + max_gen_len)
        self._ensure_cache(total)
        llama.stats = Stats(prompt_tokens=len(ids) - keep)
        start = time.perf_counter()
        logits = llama.model(torch.tensor([ids[keep:]], device=llama.device), keep, last_only=True)
        llama.stats.prefill_s = time.perf_counter() - start
        fed, reply = list(ids), []
        while len(fed) < total:
            history = torch.tensor([fed], device=llama.device) if self.sampling.repetition_penalty != 1 else None
            nxt = int(sample_next(logits[:, -1], self.sampling, history, llama.generator)[0])
            if nxt in tok.stop_ids:
                break
            reply.append(nxt)
            if on_token is not None:
                on_token(nxt)
            logits = llama.model(torch.tensor([[nxt]], device=llama.device), len(fed), last_only=True)
            fed.append(nxt)
        llama.stats.new_tokens = len(reply)
        llama.stats.decode_s = time.perf_counter() - start - llama.stats.prefill_s
        self.cached = fed
        answer = tok.decode(reply)
        self.dialog = dialog + [{"role": "assistant", "content": answer}]
        return answer
