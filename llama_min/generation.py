"""Text generation with Meta's semantics: build, generate, text_completion, chat_completion, chat sessions.

  Llama.build        load any checkpoint + its tokenizer onto a device, in a dtype
  (sampling.py)      choosing the next token: temperature, top-k, Meta's top-p, min-p, repetition penalty
  Llama.generate     ragged batches in lockstep from the shortest prompt (longer prompts are teacher-forced),
                     stop sets, logprobs of the generated tokens, echo, a per-token callback for streaming

The KV cache is sized to each request (prompt + new tokens, capped by max_seq_len). Before anything of the
window is allocated, Llama.build checks its peak against free memory (runtime/memory.py check_window), and
each request's KV cache is checked again when it is set up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import build_transformer, load_checkpoint
from .decoding.sampling import Sampling, Stats, elapsed, logprobs_of, sample_next
from .decoding.sampling import apply_repetition_penalty as apply_repetition_penalty  # re-exported: the sampling API
from .decoding.sampling import sample_top_p as sample_top_p
from .decoding.stops import StopStrings
from .errors import LlamaMinError
from .model import Transformer
from .parallel.group import broadcast_from_rank0
from .runtime.memory import check_memory, check_window, kv_cache_bytes
from .runtime.step import choose_step, unchanged_model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU that supports it; float32 on the CPU (bf16 does not pay there, see the README)."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class Llama:
    def __init__(self, model: Transformer, tokenizer, max_seq_len: int, max_batch_size: int, step=None):
        """`step`: how decode steps run (runtime/step.py); None = choose_step(model): llama_min's C step where
        it takes the model's layers, else the model's own forward. Generation calls `self.step`."""
        self.model, self.tokenizer = model, tokenizer
        self.step = step if step is not None else choose_step(model)
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.device = model.norm.weight.device
        self.tensor_parallel = getattr(model, "tensor_parallel", None) is not None  # rank 0 decides tokens
        self.stats = Stats()

    @staticmethod
    def build(ckpt_path=None, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None, seed: int = 1, quantize: Optional[str] = None,
              optimize: bool = True, chat_format: Optional[str] = None, packed: Optional[bool] = None,
              tensor_parallel: bool = False, rope_scaling=None, layout_cache: bool = True) -> "Llama":
        """Load a checkpoint (Meta dir, HF dir, .gguf, llama2.c, own dir, hub id; None = the default model).

        seed: `torch.manual_seed(seed)`, as Meta's build does; sampling then draws from torch's global
        generator, so the same seed gives Meta's samples on the same weights.
        quantize: "int8" (per-channel), "int4" / "int4-64" / "int4-128" (a scale and zero per group of 32 / 64 /
        128 weights), see quantize.py. packed: run a quantized GGUF at its own precision
        (runtime/packed.py); None = yes when the file is a quantized GGUF and neither dtype nor quantize
        is given; False = dequantize it to float. optimize: apply the inference transforms (transforms.py);
        False keeps exactly model.py's classes. chat_format: "template" (the checkpoint's Jinja template),
        "meta" or "chatml"; None = the template when the checkpoint ships one, else the built-in format.
        tensor_parallel: run as one of the processes torchrun started; each reads and holds only its slice
        of the weights (parallel/; a quantized GGUF is dequantized). Same arguments on every rank.
        rope_scaling: run past the trained window with a RoPE scaling the file does not say (it replaces the
        file's): "TYPE:FACTOR[,key=value...]" or a dict like {"type": "linear", "factor": 4.0} (keys:
        formats/common.py parse_rope_scaling); applied to ModelArgs before the memory check and the RoPE
        table, on every path. dynamic's M and yarn's L0 default to the model's trained window.
        layout_cache: a packed GGUF's converted matrices (tiles, K-quant conversions) are written once to
        llama_min's cache folder and mapped from there by the next load of the same file (runtime/
        layout_cache.py: keyed by the file's size, mtime and contents fingerprint); False converts every time.

        Memory: before the weights are read (from the file's header or config where the format has one), the
        peak of the window is checked against free memory (runtime/memory.py check_window): the RoPE table
        of 2 * max_seq_len positions while it is built, the KV cache for max_batch_size x max_seq_len, and one
        forward of generation (the last position's logits of each row). One LlamaMinError line with the
        numbers when it does not fit. (Scoring whole windows needs their logits too: `llama-min eval` checks
        that with check_window(..., scored=ctx) once the model is built.)
        """
        from .runtime.packed import load_gguf_packed, use_packed
        from .runtime.quantize import parse_quantize
        from .runtime.transforms import apply_transforms
        from .text.tokenizer import load_tokenizer

        parse_quantize(quantize)  # a bad spec fails before loading
        _check_rope_scaling(rope_scaling)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise LlamaMinError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if ckpt_path is None:
            from .assets import default_model_path

            ckpt_path = default_model_path()
        packed = use_packed(ckpt_path, packed, dtype, quantize)
        device = torch.device(device or default_device())
        dtype = dtype or default_dtype(device)
        torch.manual_seed(seed)
        if tensor_parallel:  # every rank: the same seed, its slice of the weights; rank 0 decides tokens
            from .parallel.slicing import load_rank_model
            from .parallel.group import build_rank

            tokenizer = load_tokenizer(tokenizer_path or ckpt_path, chat_format=chat_format)

            def load(rank, world, dev):
                model = load_rank_model(ckpt_path, rank, world, dev, dtype, max_seq_len, max_batch_size,
                                        rope_scaling=rope_scaling)
                _check_vocab(tokenizer, model.vocab_size, ckpt_path)
                return model
            model = build_rank(load, device, optimize=optimize, quantize=quantize)
            return Llama(model, tokenizer, max_seq_len, max_batch_size)
        tokenizer = load_tokenizer(tokenizer_path or ckpt_path, chat_format=chat_format)
        if packed:  # a quantized GGUF at its own precision: built directly from the file's blocks
            model = load_gguf_packed(ckpt_path, device, dtype, max_seq_len, max_batch_size, rope_scaling,
                                     layout_cache=layout_cache)
        else:
            model = _load_float(ckpt_path, device, dtype, max_seq_len, max_batch_size, rope_scaling)
        _check_vocab(tokenizer, model.vocab_size, ckpt_path)
        apply_transforms(model.eval().requires_grad_(False), optimize=optimize, quantize=quantize)
        return Llama(model, tokenizer, max_seq_len, max_batch_size)

    @property
    def trained_window(self) -> Optional[int]:
        """The context the checkpoint was trained for, from its file (GGUF llama.context_length, HF
        max_position_embeddings, llama2.c / own max_seq_len); None when the file does not say (Meta)."""
        return self.model.params.trained_window

    def compile(self, mode: Optional[str] = None):
        """Run one-token decode steps through torch.compile: `self.step` becomes runtime.compile.CompiledStep,
        over the step chosen before (prompts and scoring stay on that one).

        Compiles now, on a dummy one-token step, and keeps the seconds it took in `self.compile_s`
        (minutes on a CPU: freezing + max-autotune, compile.CPU_OPTIONS). One graph serves every position and
        cache length; a batch of more than one row compiles once more on first use (on a CPU with float32
        weights in oneDNN's layout, batches run eager instead). Where llama_min's C step takes the one-token
        steps (step.NativeStep: float32, int8 and 4-bit models on AVX2 CPUs) they stay on it, as it decodes
        faster than the graph; nothing is compiled until a step it does not take.
        """
        from .runtime.compile import CompiledStep

        if not isinstance(self.step, CompiledStep):
            self.step = CompiledStep(self.model, self.step, mode=mode)
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.setup_cache(1, 8)
            try:
                self.step(torch.zeros(1, 1, dtype=torch.long, device=self.device), 0)
            finally:
                self.model.clear_cache()
        self.compile_s = elapsed(start, self.device)
        return self

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every tensor once, the embedding table only as the output."""
        seen, total = set(), 0
        for name, t in self.model.state_dict(keep_vars=True).items():
            key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN's opaque weights have no data pointer
            if name.startswith("tok_embeddings.") or key in seen:  # one row per token / tied copy
                continue
            seen.add(key)
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
                 stop_ids=None, stop: Optional[list] = None,
                 on_token: Optional[Callable[[int, int], Optional[bool]]] = None,
                 on_text: Optional[Callable[[int, str], None]] = None,
                 draft: Optional["Llama"] = None, draft_tokens: int = 4):
        """Generate continuations of token-id prompts -> (tokens per row, logprobs per row or None).

        Meta's loop: rows run in lockstep from the shortest prompt (a longer prompt is fed its own tokens);
        it ends when every row has produced a stop token (`stop_ids`, default the tokenizer's) or at
        total_len = min(max_seq_len, max_gen_len + longest prompt); each row is cut to prompt + max_gen_len
        and before its stop token. Draws come from torch's global generator, as in Meta's code, unless
        `seed` is given (a private generator). `stop`: strings ending a row when its text contains one
        (stops.py). `on_token(row, id)` sees each new output token (True ends the row); `on_text(row, text)`
        streams each row's text (whole characters, never a stop string).
        `draft`: a second Llama with the same vocabulary proposes `draft_tokens` tokens per step, checked by
        this model in one forward (speculative.py; one prompt at a time; the same greedy output, the same
        sampling distribution).
        """
        s, generator = Sampling(temperature, top_p, top_k, min_p, repetition_penalty), _generator(seed, self.device)
        max_gen_len = self._check_request(prompt_tokens, max_gen_len)
        lens = [len(p) for p in prompt_tokens]
        texts = StopStrings(self.tokenizer, stop, len(lens), on_text) if stop or on_text else None
        on_token = _with_stop_strings(on_token, texts)
        if draft is not None:
            return self._speculative(draft, draft_tokens, prompt_tokens, max_gen_len, s, generator, stop_ids,
                                     on_token, logprobs, echo, texts)
        bsz, total_len = len(lens), min(self.max_seq_len, max_gen_len + max(lens))
        stop = torch.tensor(sorted(self.tokenizer.stop_ids if stop_ids is None else stop_ids), device=self.device)
        tokens = self._padded(prompt_tokens, total_len)  # (B, total_len), -1 where nothing is known yet
        is_prompt = tokens != -1
        token_logprobs = torch.zeros(bsz, total_len, device=self.device) if logprobs else None
        rows = _RowEnds(lens, max_gen_len, total_len, stop, self.device)
        self.stats = Stats(prompt_tokens=sum(lens))
        start, prev_pos = time.perf_counter(), 0
        self._setup_cache(bsz, total_len)
        try:
            with unchanged_model(self.step):  # the C step checks the model once, not every token
                for cur_pos in range(min(lens), total_len):
                    logits = self.step(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
                    history = tokens[:, :cur_pos] if repetition_penalty != 1.0 else None
                    next_token = sample_next(self.known_tokens(logits[:, -1]), s, history, generator)
                    next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                    next_token = broadcast_from_rank0(next_token) if self.tensor_parallel else next_token
                    tokens[:, cur_pos] = next_token
                    if logprobs:  # log p(token t+1 | tokens <= t): position t's logits score the token after it
                        scored = slice(prev_pos + 1, cur_pos + 1)
                        token_logprobs[:, scored] = logprobs_of(logits, tokens[:, scored])
                    if cur_pos == min(lens):
                        self.stats.prefill_s = elapsed(start, self.device)
                    prev_pos = cur_pos
                    if rows.step(cur_pos, next_token, ~is_prompt[:, cur_pos], self._asker(on_token, next_token)):
                        break  # every row has ended
        finally:
            self.model.clear_cache()
        self.stats.decode_s = elapsed(start, self.device) - self.stats.prefill_s
        return self._collect(tokens, token_logprobs, lens, max_gen_len, echo, rows.ended, rows.by_string, texts)

    def _speculative(self, draft, draft_tokens, prompt_tokens, max_gen_len, s, generator, stop_ids, on_token,
                     logprobs, echo, texts):
        """generate() with a draft model (speculative.py)."""
        from .decoding.speculative import speculative_generate

        out = speculative_generate(self, draft, prompt_tokens, max_gen_len, s, draft_tokens, generator,
                                   stop_ids, on_token, logprobs, echo)
        if texts is not None:
            texts.finish(0)
        return out

    def known_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) with the ids the tokenizer does not have (a padded embedding table) set to -inf."""
        n = getattr(self.tokenizer, "n_words", 0)  # (none, or 0: no tokenizer, ids only)
        if n <= 0 or logits.shape[-1] <= n:
            return logits
        return torch.cat([logits[:, :n], torch.full_like(logits[:, n:], float("-inf"))], dim=-1)

    def _padded(self, prompt_tokens: list, total_len: int) -> torch.Tensor:
        """(B, total_len) token ids: each prompt, then -1 (Meta's pad id, never embedded)."""
        tokens = torch.full((len(prompt_tokens), total_len), -1, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=self.device)
        return tokens

    def _setup_cache(self, bsz: int, total_len: int) -> None:
        """A KV cache for this request, after checking that it fits in free memory."""
        params, item = self.model.params, self.model.norm.weight.element_size()
        check_memory(kv_cache_bytes(params.n_layers, params.kv_heads, params.hd, bsz, total_len, item),
                     f"a KV cache of {bsz} x {total_len} positions", self.device)
        self.model.setup_cache(bsz, total_len)

    def _asker(self, on_token, next_token: torch.Tensor):
        """None, or a function: rows (bool mask) -> the rows whose callback, given its new token, asked to stop
        (under tensor parallelism, rank 0's callbacks decide)."""
        if on_token is None:
            return None

        def ask(rows: torch.Tensor) -> torch.Tensor:
            stop_here = torch.zeros_like(rows)
            for row in torch.nonzero(rows).flatten().tolist():
                if on_token(row, int(next_token[row])):
                    stop_here[row] = True
            return broadcast_from_rank0(stop_here) if self.tensor_parallel else stop_here

        return ask

    def _collect(self, tokens, token_logprobs, lens, max_gen_len, echo, ended, by_string, texts):
        """Cut each row to its generated part (plus the prompt with echo): at most max_gen_len new tokens,
        ending before its stop token (or after the token where a stop string completed)."""
        for row in range(len(lens) if texts is not None else 0):
            texts.finish(row)  # stream what the row's decoder still holds
        out_tokens, out_logprobs, reasons = [], [], []
        total_len = tokens.shape[1]
        for i, n in enumerate(lens):
            begin, end = (0 if echo else n), min(int(ended[i]), n + max_gen_len)
            out_tokens.append(tokens[i, begin:end].tolist())
            if token_logprobs is not None:
                out_logprobs.append(token_logprobs[i, begin:end].tolist())
            if by_string[i]:
                reasons.append("stop string")
            elif int(ended[i]) < min(n + max_gen_len, total_len):
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
            text = tok.decode(row)
            begin = len(tok.decode(prompt_tokens[i])) if echo else 0  # stop strings count in new text only
            r = {"generation": text[:begin] + cut_at_stop(text[begin:], extras.get("stop"))}
            if logprobs:
                r.update(tokens=[tok.decode([t]) for t in row], logprobs=lps[i])
            results.append(r)
        return results

    def chat_completion(self, dialogs: list, temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, **extras):
        """Answer dialogs ([{"role", "content"}, ...]) in the tokenizer's chat format.

        A dialog that ends with an assistant message is a prefill: the answer continues that message
        (the returned content is the continuation only)."""
        prompt_tokens = [self.tokenizer.encode_dialog(d, continue_final_message=True)
                         if d[-1]["role"] == "assistant" else self.tokenizer.encode_dialog(d) for d in dialogs]
        out, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **extras)
        results = []
        for i, row in enumerate(out):
            text = cut_at_stop(self.tokenizer.decode(row), extras.get("stop"))
            r = {"generation": {"role": "assistant", "content": text}}
            if logprobs:
                r.update(tokens=[self.tokenizer.decode([t]) for t in row], logprobs=lps[i])
            results.append(r)
        return results



class _RowEnds:
    """Where each row of a generate() batch ends: at its stop token, where its callback (stop strings) asked,
    or at the end of the loop. Meta's rule: the loop runs until every row has ended (`done`)."""

    def __init__(self, lens: list, max_gen_len: int, total_len: int, stop: torch.Tensor, device):
        self.stop = stop
        self.row_end = torch.tensor([n + max_gen_len for n in lens], device=device)  # output cut per row
        self.ended = torch.full((len(lens),), total_len, device=device)  # where a row's output stops
        self.by_string = torch.zeros(len(lens), dtype=torch.bool, device=device)  # ended by its callback
        self.done = torch.zeros(len(lens), dtype=torch.bool, device=device)

    def step(self, cur_pos: int, next_token: torch.Tensor, new: torch.Tensor, ask) -> bool:
        """Rows `new` got a generated token at cur_pos; True when every row has ended."""
        new = new & ~self.done
        stopped = new & torch.isin(next_token, self.stop)
        self.ended = torch.where(stopped, cur_pos, self.ended)
        if ask is not None:  # stream, and let the callback end rows
            asked = ask(new & ~stopped & (cur_pos < self.row_end))
            self.ended, self.by_string = torch.where(asked, cur_pos + 1, self.ended), self.by_string | asked
            stopped |= asked
        self.done |= stopped
        return bool(self.done.all())


def _with_stop_strings(on_token, texts: Optional[StopStrings]):
    """The per-token callback, extended to feed the stop-string matcher (which may end the row)."""
    if texts is None:
        return on_token

    def callback(row: int, token_id: int) -> bool:
        asked = bool(on_token(row, token_id)) if on_token is not None else False
        return texts.push(row, token_id) or asked

    return callback


def cut_at_stop(text: str, stop: Optional[list]) -> str:
    """The text before the first occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in (stop or []) if s) if i >= 0]
    return text[: min(hits)] if hits else text


def _generator(seed: Optional[int], device):
    """None (torch's global generator, as Meta's code) or a private generator seeded with `seed`."""
    return None if seed is None else torch.Generator(device).manual_seed(seed)


def _load_float(ckpt_path, device, dtype, max_seq_len: int, max_batch_size: int, rope_scaling=None) -> Transformer:
    """The float model, the window's memory checked before its weights are read where the header tells
    the sizes (GGUF, HF, own, Meta), else after reading them but before the RoPE table (llama2.c, hub ids).
    `rope_scaling` (Llama.build's) replaces the file's scaling in both."""
    from .formats.common import rope_override

    item = torch.empty((), dtype=dtype).element_size()
    header = _header_args(ckpt_path)
    if header is not None:
        check_window(rope_override(header, rope_scaling), max_seq_len, max_batch_size, device, item)
    args, state_dict = load_checkpoint(ckpt_path, dtype=dtype)
    rope_override(args, rope_scaling)  # before max_seq_len: dynamic's M defaults to the file's window
    args.max_seq_len = max_seq_len
    if header is None:
        check_window(args, max_seq_len, max_batch_size, device, item)
    return build_transformer(args, state_dict, device=device)


def _header_args(ckpt_path):
    """ModelArgs from a checkpoint's header or config alone (no weight read), or None where only the
    weights tell the sizes (llama2.c files, hub ids) or the format is not recognised here."""
    from .checkpoint import detect_format
    from .files import read_json
    from .formats.common import args_from_params
    from .formats.hf import args_from_hf_config
    from .runtime.packed import gguf_header_args

    try:
        fmt = detect_format(ckpt_path)
    except (ValueError, OSError):
        return None  # a hub id, or an error load_checkpoint reports in its own words
    path = Path(ckpt_path)
    if fmt == "gguf":
        return gguf_header_args(path)[0]
    if fmt == "hf":
        return args_from_hf_config(read_json(path / "config.json", "config.json"), path / "config.json")
    if fmt in ("own", "meta"):
        return args_from_params(read_json(path / "params.json", "params.json"), path / "params.json")
    return None


def _check_rope_scaling(rope_scaling) -> None:
    """A bad rope_scaling fails before anything is loaded (one LlamaMinError line)."""
    from .formats.common import rope_override
    from .model import ModelArgs

    rope_override(ModelArgs(dim=64, n_layers=1, n_heads=1, max_seq_len=64), rope_scaling)


def _check_vocab(tokenizer, vocab_size: int, ckpt_path) -> None:
    if tokenizer.n_words > vocab_size:  # (more embedding rows than pieces is normal: padding)
        raise LlamaMinError(f"{ckpt_path}: the tokenizer has {tokenizer.n_words} tokens, the model only "
                            f"{vocab_size} embedding rows: wrong tokenizer for this checkpoint?")
