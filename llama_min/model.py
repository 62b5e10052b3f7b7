"""The Llama transformer, exactly as Meta's reference computes it, in one file.

Read top to bottom:
  ModelArgs              the hyper-parameters (Meta's params.json fields, plus what HF/GGUF files add)
  RMSNorm                root-mean-square layer norm
  precompute_freqs_cis   rotary position embeddings (RoPE) as unit complex numbers, + the scalings that
                         stretch them past the trained window (linear, dynamic NTK, YaRN, Llama 3.1)
  apply_rotary_emb       rotate each adjacent pair of q/k features by its position's angle
  repeat_kv              grouped-query attention: share each key/value head among H/K query heads
  attention              softmax(q k^T / sqrt(hd) + mask) v, written out and as PyTorch's fused kernel
  KVCache                keys and values of past positions, so generation computes each token once
  Attention              causal self-attention (q, k, v projections, RoPE, GQA, output projection)
  FeedForward            the SwiGLU MLP
  TransformerBlock       pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))
  Transformer            embeddings -> blocks -> norm -> output projection, float32 logits

Shapes: B batch, T tokens in this step, D model dim, H query heads, K key/value heads,
hd head dim, S cached positions, V vocab. No biases anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# The RoPE scalings ModelArgs.rope_scaling_type may name (see "Scalings" below).
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (plain multi-head attention)
    vocab_size: int = -1  # -1 = take it from the tokenizer / the embedding tensor
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit FFN size (HF intermediate_size, GGUF); overrides the rule
    head_dim: Optional[int] = None  # None = dim // n_heads; some models set it explicitly
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1+ frequency scaling (Meta's flag: the same as rope_scaling_type "llama3")
    # RoPE past the trained window (see "Scalings" below): None | "linear" | "dynamic" | "yarn" | "llama3"
    rope_scaling_type: Optional[str] = None
    rope_scaling_factor: float = 8.0  # every scaling's factor; llama3: 8 for Llama 3.1/3.3, 32 for Llama 3.2 1B/3B
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_pos: int = 8192  # the window the scaling stretches: llama3's and yarn's L0, dynamic's M
    rope_beta_fast: float = 32.0  # yarn: pairs turning more than this many times in L0 keep their frequency
    rope_beta_slow: float = 1.0  # yarn: pairs turning fewer times than this in L0 are fully interpolated
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole pairs (floor / ceil)
    rope_attention_factor: Optional[float] = None  # yarn: the magnitude a of freqs_cis; None = from the factor
    rope_mscale: Optional[float] = None  # yarn (DeepSeek's form): a = mscale(mscale) / mscale(mscale_all_dim)
    rope_mscale_all_dim: Optional[float] = None
    rope_freq_divisors: Optional[list] = None  # GGUF `rope_freqs`: theta_i /= divisors[i]
    tie_word_embeddings: bool = False  # output projection shares the embedding matrix
    max_seq_len: int = 2048
    sliding_window: Optional[int] = None  # Mistral: keys older than this are masked; requests must fit inside it
    # The context the checkpoint was trained for, when its file says (GGUF context_length, HF
    # max_position_embeddings, llama2.c / own max_seq_len); None = unknown (Meta's params.json). Read, never used
    # by the math; not part of equality (a file's metadata, not the model).
    trained_window: Optional[int] = field(default=None, compare=False)

    def __post_init__(self):
        """Check sizes and divisibility now, not later as a shape error deep in a forward pass."""
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", "n_kv_heads", "hidden_dim",
                     "head_dim", "vocab_size", "sliding_window", "trained_window"):
            value, optional = getattr(self, name), name in ("n_kv_heads", "hidden_dim", "head_dim", "sliding_window",
                                                            "trained_window")
            if not (optional and value is None or name == "vocab_size" and value == -1):  # -1: from the tokenizer
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_beta_fast", "rope_beta_slow",
                     "rope_attention_factor"):
            value = getattr(self, name)
            if name == "rope_attention_factor" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self._check_rope_scaling()
        if self.n_heads % self.kv_heads or (self.head_dim is None and self.dim % self.n_heads) or self.hd % 2:
            raise ValueError(f"heads do not divide: n_heads {self.n_heads} must be a multiple of n_kv_heads "
                             f"{self.kv_heads}, dim {self.dim} divisible by n_heads (or head_dim given), and the "
                             f"head dim ({self.hd}) even (RoPE rotates pairs)")

    def _check_rope_scaling(self):
        """One name for the scaling: rope_scaling_type "llama3" and Meta's use_scaled_rope always agree."""
        kind = self.rope_scaling_type
        if kind is not None and kind not in ROPE_SCALINGS:
            raise ValueError(f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_SCALINGS)} (or none)")
        if self.use_scaled_rope and kind not in (None, "llama3"):
            raise ValueError(f"use_scaled_rope (Llama 3.1 scaling) conflicts with rope_scaling_type {kind!r}")
        if self.use_scaled_rope or kind == "llama3":
            self.use_scaled_rope, self.rope_scaling_type = True, "llama3"

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """Build from a params.json dict; nested {"model": {...}} is accepted, unknown keys are ignored."""
        if isinstance(params.get("model"), dict):
            params = params["model"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """F from Meta's rule: int(2*4d/3), times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32, cast back before the weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE)
#
# q.k alone ignores token order; RoPE encodes position m by rotating q and k (not v), in every layer.
# Split each head vector (hd features) into hd/2 adjacent pairs (x[2i], x[2i+1]) and read pair i
# as one complex number z_i = x[2i] + j*x[2i+1]. At position m, RoPE rotates it:
#     z_i  ->  z_i * exp(j * m * theta_i),        theta_i = base^(-2i/hd)
# Rotation keeps lengths, and the real dot product of a query at m and a key at n is
#     q_m . k_n = sum_i Re( q_i conj(k_i) exp(j (m - n) theta_i) )
# which depends on the positions only through m - n: attention sees relative distance.
# theta_0 = 1 rad per token (pair 0 spins fast, resolving nearby tokens); the last pair turns
# ~1/base rad per token (wavelength ~2*pi*base tokens), so it still tells far-apart positions apart.
# exp(j*m*theta_i) is the same for every layer and head, so it is computed once: `freqs_cis`, unit
# complex numbers (a rotation is then one complex multiply), angles in float32 (bf16 would be off
# by radians). Scalings (Llama 3.1+, YaRN, ...) turn the slow pairs slower still to reach contexts longer
# than the trained one (below). Pictures of all this: scripts/rope_viz.py.
#
# Scalings: RoPE past the trained window
#
# A pair whose wavelength 2*pi/theta_i is longer than the trained window never completed a turn in
# training: the model only ever saw part of its circle. Past the window such pairs reach angles it never
# saw, and attention breaks down. Each scaling slows the slow pairs so the longer context maps onto
# angles from training, and leaves the fast pairs (local order, many turns per window) alone or nearly so:
#   linear   every pair slowed by the factor (position interpolation)
#   dynamic  a larger base, grown with the current length (NTK-aware): slow pairs slowed most
#   yarn     fast pairs kept, slow pairs slowed by the factor, a ramp between; attention sharpened by a
#   llama3   Meta's: like yarn's ramp, judged by wavelength against the original window
# They are functions of the frequencies theta_i (rope_frequencies applies the model's one); yarn also
# scales the table's magnitude: freqs_cis[m, i] = a * exp(j m theta'_i), so q.k is multiplied by a^2.
# ---------------------------------------------------------------------------------------------


def base_frequencies(base: float, hd: int) -> torch.Tensor:
    """theta_i = base^(-2i/hd) for i = 0 .. hd/2-1, (hd/2,) float32: Meta's formula, computed on the CPU."""
    return 1.0 / (base ** (torch.arange(0, hd, 2, device="cpu")[: hd // 2].float() / hd))


def linear_scale_frequencies(freqs: torch.Tensor, factor: float) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): theta'_i = theta_i / factor.

    Position m turns every pair as far as position m / factor did: factor x the window maps onto the
    angles of the trained one (fine-tuned models need only a short adaptation to the closer spacing).
    """
    return freqs / factor


def dynamic_ntk_base(base: float, factor: float, seq_len: int, trained: int, hd: int) -> float:
    """NTK-aware scaling, grown with the length: base' = base * (factor * s / M - (factor - 1)) ^ (hd / (hd - 2)).

    s = seq_len, the largest position + 1 of the forward; M = trained, the window trained on; at s <= M
    base' = base (unchanged). A larger base slows the slow pairs most and the fast pairs hardly at all
    (theta_0 = 1 whatever the base), so local order keeps its trained resolution with no fine-tuning; the
    exponent divides the slowest pair's theta by exactly k = factor * s / M - (factor - 1).
    Semantics of transformers' "dynamic": the table is recomputed per forward from the positions it covers;
    with a KV cache, keys already cached keep the rotation they were stored with (only the new tokens are
    rotated by the new table), so the result depends on how the sequence was split into forwards.
    """
    s = max(seq_len, trained)
    return base * ((factor * s / trained) - (factor - 1)) ** (hd / (hd - 2))


def yarn_scale_frequencies(
    freqs: torch.Tensor, base: float, factor: float, original_max_pos: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
) -> torch.Tensor:
    """YaRN (Peng et al. 2023): per pair, between extrapolation (kept) and interpolation (theta / factor).

    Pair i turns r = L0 * theta_i / (2*pi) times over the original window L0; the pair index where it turns
    r times is d(r) = hd * ln(L0 / (2*pi*r)) / (2 ln base). Pairs turning more than beta_fast times are kept
    (their trained angles already cover every phase), fewer than beta_slow are interpolated, a linear ramp
    between: low = max(floor(d(beta_fast)), 0), high = min(ceil(d(beta_slow)), hd - 1) (no floor/ceil when
    truncate is false; high += 0.001 if they meet), ramp_i = clamp((i - low) / (high - low), 0, 1),
    theta'_i = theta_i / factor * ramp_i + theta_i * (1 - ramp_i).
    """
    hd = 2 * freqs.shape[0]

    def pair_turning(turns: float) -> float:  # d(r)
        return hd * math.log(original_max_pos / (2 * math.pi * turns)) / (2 * math.log(base))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device=freqs.device) - low) / (high - low)).clamp(0, 1)  # (hd/2,)
    return freqs / factor * ramp + freqs * (1 - ramp)


def yarn_attention_factor(
    factor: float, attention_factor: Optional[float] = None,
    mscale: Optional[float] = None, mscale_all_dim: Optional[float] = None,
) -> float:
    """YaRN's a, the magnitude of freqs_cis: attention_factor when given, else 0.1 ln(factor) + 1, or with both
    mscale and mscale_all_dim (DeepSeek's form) (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1);
    each term is 1 at factor <= 1.

    Interpolated pairs spread attention more evenly over the longer context (softmax entropy rises);
    multiplying q and k by a multiplies the logits by a^2, sharpening it back.
    """
    if attention_factor is not None:
        return float(attention_factor)

    def mscale_of(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return mscale_of(mscale) / mscale_of(mscale_all_dim)
    return mscale_of(1.0)


def llama3_scale_frequencies(
    freqs: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_pos: int
) -> torch.Tensor:
    """Llama 3.1 long-context scaling of theta_i, judged by each pair's wavelength w_i = 2*pi/theta_i.

    Short wavelengths (w < orig/high, 2048 tokens) are kept: local order stays as trained; long ones
    (w > orig/low, 8192 = the original context) are slowed by `factor` (8, or 32 for Llama 3.2 1B/3B),
    so far positions map onto angles seen in training; in between, blend:
    s = (orig/w - low) / (high - low), theta' = (1-s) * theta/factor + s * theta.
    """
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > original_max_pos / low_freq_factor, freqs / factor, blended)
    return torch.where(wavelen < original_max_pos / high_freq_factor, freqs, scaled)


def rope_frequencies(args: ModelArgs, seq_len: Optional[int] = None) -> torch.Tensor:
    """theta'_i (hd/2,) float32 on the CPU, with the checkpoint's scaling applied.

    seq_len: the largest position + 1 of the forward the table is for; only `dynamic` depends on it
    (None: at most the trained window, where `dynamic` is unscaled).
    """
    kind, factor, base = args.rope_scaling_type, args.rope_scaling_factor, args.rope_theta
    if kind == "dynamic" and seq_len is not None:
        base = dynamic_ntk_base(base, factor, seq_len, args.rope_original_max_pos, args.hd)
    freqs = base_frequencies(base, args.hd)
    if kind == "linear":
        freqs = linear_scale_frequencies(freqs, factor)
    elif kind == "yarn":
        freqs = yarn_scale_frequencies(freqs, base, factor, args.rope_original_max_pos,
                                       args.rope_beta_fast, args.rope_beta_slow, args.rope_truncate)
    elif kind == "llama3":
        freqs = llama3_scale_frequencies(freqs, factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                                         args.rope_original_max_pos)
    if args.rope_freq_divisors is not None:  # GGUF stores the scaling as per-pair divisors
        freqs = freqs / torch.tensor(args.rope_freq_divisors, dtype=torch.float32, device="cpu")
    return freqs


def rope_magnitude(args: ModelArgs) -> float:
    """|freqs_cis|: yarn's attention factor a, 1 for every other scaling."""
    if args.rope_scaling_type != "yarn":
        return 1.0
    return yarn_attention_factor(args.rope_scaling_factor, args.rope_attention_factor,
                                 args.rope_mscale, args.rope_mscale_all_dim)


def precompute_freqs_cis(freqs: torch.Tensor, end: int, magnitude: float = 1.0, start: int = 0) -> torch.Tensor:
    """freqs_cis[m, i] = magnitude * exp(j * m * theta_i) for m = start .. end-1: (end-start, hd/2) complex64.

    The angles m * theta_i are computed in float32: in bf16 they would be off by whole radians at position
    ~8000. Complex numbers make the rotation a single multiplication (of magnitude 1 but under yarn).
    """
    positions = torch.arange(start, end, dtype=torch.float32, device=freqs.device)
    angles = torch.outer(positions, freqs.float())  # (end - start, hd/2)
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate q (B,T,H,hd) and k (B,T,K,hd) by freqs_cis (T, hd/2): pairs (x[2i], x[2i+1]) as complex."""
    q_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, H, hd/2)
    k_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))  # (B, T, K, hd/2)
    rot = freqs_cis[None, :, None, :]  # (1, T, 1, hd/2): the same angle for every batch row and head
    xq_out = torch.view_as_real(q_c * rot).flatten(3)  # back to (B, T, H, hd)
    xk_out = torch.view_as_real(k_c * rot).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, S, K, hd) -> (B, S, K*n_rep, hd), equal to torch.repeat_interleave(x, n_rep, dim=2).

    Query head h reads key/value head h // n_rep: each KV head serves a contiguous group.
    """
    if n_rep == 1:
        return x
    B, S, K, hd = x.shape
    return x[:, :, :, None, :].expand(B, S, K, n_rep, hd).reshape(B, S, K * n_rep, hd)


def causal_mask(T: int, start_pos: int, device=None) -> torch.Tensor:
    """(T, start_pos+T) additive mask: 0 over the cached columns, then -inf above the diagonal."""
    new = torch.full((T, T), float("-inf"), device=device).triu(1)  # row i sees new columns <= i
    return torch.cat([torch.zeros(T, start_pos, device=device), new], dim=1)


def attention_math(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v with the softmax in float32; q (B,H,T,hd), k/v (B,H,S,hd).

    Written out; `attention` computes the same with a fused kernel (equal within rounding: test_model.py)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores + mask
    return F.softmax(scores.float(), dim=-1).type_as(q) @ v  # (B, H, T, hd)


def attention(q, k, v, mask):
    """`attention_math` computed by F.scaled_dot_product_attention (fused: no (T, S) scores in memory)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache:
    """One layer's keys (after RoPE) and values of the positions seen so far, (B, max_len, K, hd) each.

    Generation state, not weights: a plain object, never in the state dict."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, T, K, hd) at positions [start_pos, start_pos+T); return (B, start_pos+T, K, hd) each."""
        B, T = k.shape[:2]
        self.k[:B, start_pos : start_pos + T] = k
        self.v[:B, start_pos : start_pos + T] = v
        return self.k[:B, : start_pos + T], self.v[:B, : start_pos + T]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.hd
        self.n_rep = self.n_heads // self.n_kv_heads  # query heads per key/value head
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None  # set by Transformer.setup_cache for generation

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)  # positions [start_pos, start_pos+T)
        if self.cache is not None:  # generation: attend to every position so far, not only this step's
            k, v = self.cache.update(start_pos, k, v)  # (B, S, K, hd), S = start_pos + T
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, S, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, hd)
        out = attention(q, k, v, mask)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*hd) -> (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2( silu(w1 x) * w3 x ), w1 = gate (F x D), w3 = up (F x D), w2 = down (D x F)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size, self.n_layers = params.vocab_size, params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute, not a buffer: model.to(bfloat16) would cast a complex buffer to a real
        # dtype and silently drop its imaginary part. Meta precomputes twice the window.
        # `dynamic` scaling: this is its table up to the trained window; past it, rope_rows builds one per forward.
        self.freqs_cis = precompute_freqs_cis(rope_frequencies(params), params.max_seq_len * 2, rope_magnitude(params))

    def tie_weights(self):
        """Share the embedding matrix with the output projection when the checkpoint says so."""
        if self.params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_cache(self, batch_size: int, max_len: int):
        """Give every layer a KV cache of max_len positions; size it to the request, not the window."""
        if max_len > self.freqs_cis.shape[0]:
            raise ValueError(f"cache of {max_len} positions exceeds RoPE table of {self.freqs_cis.shape[0]}")
        ref = self.norm.weight  # device and activation dtype (linear layers may hold int8)
        for layer in self.layers:
            att = layer.attention
            att.cache = KVCache(batch_size, max_len, att.n_kv_heads, att.head_dim, ref.dtype, ref.device)

    def clear_cache(self):
        """Back to plain causal attention over the given tokens (training, scoring)."""
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_len(self) -> int:
        """Positions the KV cache can hold (0 when there is none: plain causal attention)."""
        cache = self.layers[0].attention.cache if self.n_layers else None
        return 0 if cache is None else cache.k.shape[1]

    def rope_rows(self, start_pos: int, T: int, device=None) -> torch.Tensor:
        """freqs_cis (T, hd/2) for positions [start_pos, start_pos+T): rows of the precomputed table, except
        for `dynamic` scaling past the trained window, whose table depends on s = start_pos + T, the length this
        forward reaches: its rows are computed for s (keys cached by earlier forwards keep their rotation)."""
        p, end = self.params, start_pos + T
        device = self.freqs_cis.device if device is None else torch.device(device)
        if p.rope_scaling_type == "dynamic" and end > p.rope_original_max_pos:
            return precompute_freqs_cis(rope_frequencies(p, end), end, start=start_pos).to(device)
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis[start_pos:end]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions [start_pos, start_pos+T) -> float32 logits (B, T, V).

        last_only=True returns only the last position's logits (B, 1, V), the same numbers as
        forward(...)[:, -1:]: all that sampling the next token needs (norm and output work per position).
        """
        B, T = tokens.shape
        if start_pos + T > self.freqs_cis.shape[0]:
            raise ValueError(f"positions up to {start_pos + T} exceed the RoPE table ({self.freqs_cis.shape[0]})")
        freqs_cis = self.rope_rows(start_pos, T, tokens.device)  # (T, hd/2)
        h = self.tok_embeddings(tokens)  # (B, T, D)

        mask = None  # a single new token may look at every cached position
        if T > 1:
            mask = causal_mask(T, start_pos, tokens.device).to(h.dtype)  # (T, start_pos + T)

        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (B, T, V)
