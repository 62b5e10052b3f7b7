"""Inference transforms that change how the reference model computes, never what (within float rounding).

  FastAttention          model.py's Attention with shortcuts: one-token decoding attends per KV head
                         without copying the cache n_rep times, longer inputs too (PyTorch >= 2.5),
                         and a prompt from position 0 lets the fused kernel build its causal mask itself.
  transpose_wide_layers  float32 CPU weights of wide layers stored transposed (below).
  fuse_projections       q/k/v from one matrix product, the FFN's gate/up from another (FusedAttention,
                         FusedFeedForward): fewer, larger products per layer.
  compile_decode         one-token steps through torch.compile (CompiledDecode): one graph for every
                         position, RoPE in real arithmetic (see the section near the end).
  OneDNNLinear           float32 CPU weights reordered for oneDNN: a few rows cost about one row.

Wide layers stored transposed:

A decode step multiplies one activation row by every weight matrix: y = x W^T, a matrix-vector
product that only streams W from memory. With W stored as PyTorch keeps it, (out, in), the CPU
kernel takes one dot product per short row of `in` numbers; for layers with out >= in (q, o, the
FFN gate/up, the output projection) that runs at about half the machine's bandwidth here
(12 GB/s for SmolLM2's 1536 x 576 and 49152 x 576 matrices, against 18-23 GB/s for the same bytes
stored as W^T, (in, out), and multiplied as x @ W^T). Narrow layers (out < in: the FFN down
projection, small k/v) are faster as they are and stay. The numbers are the same up to float
rounding order (tests/test_fast.py). Measured with scripts/benchmark.py; bf16 and GPUs do not gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from ..model import Attention, FeedForward, RMSNorm, apply_rotary_emb, repeat_kv
from .quantize import PREFILL_ROWS, can_fuse_quantized, fuse_quantized, onednn_available, prompt_linear


# PyTorch >= 2.5's attention takes fewer key/value heads than query heads itself (enable_gqa), with
# query head h reading KV head h // n_rep: what repeat_kv builds, without copying the keys and values.
SDPA_GQA = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 5)


class FastAttention(Attention):
    """Attention, same weights and cache, with shortcuts that give the same numbers (tests/test_fast.py)."""

    @classmethod
    def from_reference(cls, ref: Attention) -> "FastAttention":
        """Take over a reference Attention's projections (shared, not copied)."""
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.n_heads, fast.n_kv_heads, fast.head_dim, fast.n_rep = ref.n_heads, ref.n_kv_heads, ref.head_dim, ref.n_rep
        fast.wq, fast.wk, fast.wv, fast.wo = ref.wq, ref.wk, ref.wv, ref.wo
        fast.cache = ref.cache
        return fast

    def project(self, x: torch.Tensor):
        """x (B, T, D) -> q (B, T, H, hd), k and v (B, T, K, hd), before RoPE."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    native_decode = False  # set by use_native_decode: one-token steps in one call of llama_min's kernel

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if T == 1 and self.native_decode and self.cache is not None:  # RoPE, cache write, attention: one call
            out = native.decode_attention(q, k, v, freqs_cis, start_pos, self.cache.k, self.cache.v)  # (B, H*hd)
            return self.wo(out.view(B, 1, -1))
        q, k = apply_rotary_emb(q, k, freqs_cis)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, S, K, hd)
        if T == 1:
            out = self._decode_gqa(q, k, v)  # (B, H, hd)
        else:
            gqa = {"enable_gqa": True} if SDPA_GQA and self.n_rep > 1 else {}  # query head h reads KV head h // n_rep
            if not gqa:
                k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, S, H, hd)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, hd)
            if start_pos == 0:  # the mask is a plain causal square: the kernel builds it
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
            out = out.transpose(1, 2)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, -1))

    def _decode_gqa(self, q, k, v):
        """One new token: the n_rep query heads sharing KV head g attend as n_rep "positions" of one head.

        q (B, 1, H, hd) -> (B, K, n_rep, hd) against k, v (B, S, K, hd) -> (B, K, S, hd): the same numbers
        as repeat_kv + per-head attention, without copying the cache. Returns (B, H, hd).
        """
        B = q.shape[0]
        q = q.view(B, self.n_kv_heads, self.n_rep, self.head_dim)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # (B, K, n_rep, hd)
        return out.reshape(B, self.n_heads, self.head_dim)


def use_fast_attention(model) -> nn.Module:
    """Swap every layer's Attention for a FastAttention holding the same projections."""
    for layer in model.layers:
        if type(layer.attention) is Attention:
            layer.attention = FastAttention.from_reference(layer.attention)
    return model


class TransposedLinear(nn.Module):
    """y = x @ W^T with W^T stored contiguous as (in, out). Holds the same numbers as the nn.Linear."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_t", weight.detach().t().contiguous())  # (in, out)

    @classmethod
    def from_transposed(cls, weight_t: torch.Tensor) -> "TransposedLinear":
        """Wrap a W^T (in, out) that is already contiguous (no copy)."""
        lin = cls.__new__(cls)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = weight_t.shape
        lin.register_buffer("weight_t", weight_t)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(-1, self.in_features) @ self.weight_t  # 2-D: one GEMM, the weight read once
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored transposed"


class TransposedEmbedding(nn.Module):
    """Token lookup from the transposed output matrix of a tied model (no second copy of it)."""

    def __init__(self, output: TransposedLinear):
        super().__init__()
        self.output = [output]  # a plain list: do not register the shared module twice

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight_t = self.output[0].weight_t  # (D, V): token t's embedding is column t
        rows = weight_t.index_select(1, tokens.flatten()).t().contiguous()  # (B*T, D), a normal layout
        return rows.view(*tokens.shape, -1)  # (B, T, D)


def transpose_wide_layers(model) -> nn.Module:
    """In a Transformer, replace every nn.Linear with out_features >= in_features by a TransposedLinear.

    In a tied model the embedding then reads its rows from the transposed output matrix.
    """
    tied = model.output.weight is model.tok_embeddings.weight
    _swap(model)
    if tied and isinstance(model.output, TransposedLinear):
        model.tok_embeddings = TransposedEmbedding(model.output)
    return model


def _swap(module: nn.Module):
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.out_features >= child.in_features:
            setattr(module, name, TransposedLinear(child.weight))
        else:
            _swap(child)


# ------------------------------------------------------------------------------------------------
# Weights in oneDNN's own blocked layout
#
# For products of a few rows (a speculative verification of k+1 tokens, a batch of 8 decoding rows) the
# default float32 CPU kernel (MKL) runs here about one row at a time: 5 rows cost 4-5x one row. oneDNN,
# given the weight once reordered into its blocked layout, reads the weight once for all the rows: 5 rows
# of SmolLM2's 49152 x 576 output cost 13 ms against 59 ms, one row the same as before, and a 512-token
# prompt 1.3x less (measured on this project's 2-core AVX2 machine). The reordered weight is an opaque
# tensor: it cannot be indexed, so a tied embedding keeps its own dense table, and torch.compile
# cannot trace it, so the compiled step gets dense copies of these layers (CompiledDecode, dense_twin):
# a compiled float32 CPU model holds its weights twice, the eager prompts keep oneDNN's speed.
# ------------------------------------------------------------------------------------------------


class OneDNNLinear(nn.Module):
    """y = x W^T for float32 CPU inference, W (out, in) held reordered for oneDNN (`weight_packed`, opaque)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight_packed, None,
                                               "none", [None], "")
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """W (out, in) as an ordinary tensor (a copy)."""
        return self.weight_packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN layout"


def use_onednn_linears(model) -> nn.Module:
    """Every float32 CPU nn.Linear in the model -> OneDNNLinear (the dense weight dropped; a tied embedding
    keeps the shared table as its own)."""
    return swap_float32_linears(model, OneDNNLinear)


def swap_float32_linears(module: nn.Module, make) -> nn.Module:
    """Replace every float32 CPU nn.Linear under `module` by make(its weight)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            setattr(module, name, make(child.weight))
        else:
            swap_float32_linears(child, make)
    return module


def dense_layer(layer: OneDNNLinear) -> nn.Module:
    """The same product on an ordinary weight (a copy): W^T where that layout streams faster (wide layers,
    see above), else an nn.Linear."""
    weight = layer.dense_weight()
    return TransposedLinear(weight) if layer.out_features >= layer.in_features else linear_holding(weight)


def dense_twin(module: nn.Module) -> nn.Module:
    """A module tree that shares everything with `module` except its OneDNNLinear layers, which are dense
    copies (dense_layer); `module` itself when it has none."""
    if isinstance(module, OneDNNLinear):
        return dense_layer(module)
    if not any(isinstance(m, OneDNNLinear) for m in module.modules()):
        return module
    twin = module.__class__.__new__(module.__class__)
    twin.__dict__ = dict(module.__dict__)
    twin._modules = {name: dense_twin(child) for name, child in module._modules.items()}
    return twin


# ------------------------------------------------------------------------------------------------
# llama_min's own float32 kernel (native.py, kernels_avx2.c)
#
# Where it builds (an AVX2 CPU with a C compiler), float32 CPU models decode through it instead of the
# two layouts above: the weight stays the ordinary (out, in) tensor, one decode row streams it at 20-28
# GB/s where MKL and oneDNN reach 10-15 on SmolLM2's short rows, and a few rows (a batch, a speculative
# verification) read it once. Prompts of PREFILL_ROWS rows or more go to a matrix-matrix kernel
# (quantize.prompt_linear: oneDNN or F.linear), which are faster there.
# ------------------------------------------------------------------------------------------------


class NativeLinear(nn.Module):
    """y = x W^T for float32 CPU inference, W (out, in) the nn.Linear's own tensor (shared, not copied)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if x2.shape[0] >= PREFILL_ROWS:
            return prompt_linear(x, self.weight)
        return native.f32_linear(x2, self.weight).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, llama_min's AVX2 kernel"


def use_native_linears(model) -> nn.Module:
    """Every float32 CPU nn.Linear in the model -> NativeLinear holding the same weight tensor (a tied
    embedding keeps sharing it)."""
    return swap_float32_linears(model, NativeLinear)


class NativeRMSNorm(RMSNorm):
    """model.py's RMSNorm, float32 CPU activations normalised in one call of llama_min's kernel."""

    @classmethod
    def from_reference(cls, ref: RMSNorm) -> "NativeRMSNorm":
        norm = cls.__new__(cls)
        nn.Module.__init__(norm)
        norm.eps, norm.weight = ref.eps, ref.weight  # the same Parameter
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _native_activations(x):
            return super().forward(x)  # (a compiled graph fuses the reference's operations itself)
        return native.rms_norm(x, self.weight, self.eps)


def _native_activations(x: torch.Tensor) -> bool:
    """Whether x can go through llama_min's eager kernels: float32 on a CPU, outside a compiled graph and
    outside autograd (they have no backward)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad))


def use_native_decode(model) -> nn.Module:
    """The small operations between the matrix products through llama_min's kernels (native.py): every
    RMSNorm -> NativeRMSNorm, FastAttention's one-token steps in one decode_attention call (RoPE, cache
    write, attention), and FusedFeedForward's silu(gate) * up in one swiglu call. For models whose
    activations are float32 on a CPU where the kernels build."""
    for layer in model.layers:
        layer.attention_norm = NativeRMSNorm.from_reference(layer.attention_norm)
        layer.ffn_norm = NativeRMSNorm.from_reference(layer.ffn_norm)
        if isinstance(layer.attention, FastAttention):
            layer.attention.native_decode = True
        if isinstance(layer.feed_forward, FusedFeedForward):
            layer.feed_forward.native_swiglu = True
    model.norm = NativeRMSNorm.from_reference(model.norm)
    return model


# ------------------------------------------------------------------------------------------------
# Fused projections: q, k, v in one matrix product, the FFN's gate and up in another
# ------------------------------------------------------------------------------------------------


def fuse_linears(linears, transposed: bool) -> nn.Module:
    """Stack bias-free nn.Linear weights W_1 (n_1, D), W_2 (n_2, D), ... into one layer D -> n_1 + n_2 + ...

    y = x [W_1; W_2; ...]^T = [x W_1^T, x W_2^T, ...]: one pass over the weights instead of several.
    transposed=True stores a wide stack as W^T (D, n_1 + n_2 + ...) directly (a TransposedLinear). Either way
    one concatenation builds it, and the caller drops the originals: the weights are never held twice.
    """
    if not all(type(m) is nn.Linear for m in linears):  # quantized layers: their buffers stacked along N
        return fuse_quantized(linears)
    weights = [lin.weight.detach() for lin in linears]
    if transposed and sum(w.shape[0] for w in weights) >= weights[0].shape[1]:  # wide: W^T pays (see above)
        return TransposedLinear.from_transposed(torch.cat([w.t() for w in weights], dim=1))
    return linear_holding(torch.cat(weights, dim=0))  # (n_1 + n_2 + ..., D)


def linear_holding(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear whose weight is this (out, in) tensor itself (no copy, no random init)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


class FusedAttention(FastAttention):
    """FastAttention whose q, k, v come from one product: wqkv = [Wq; Wk; Wv], (H*hd + 2*K*hd) x D."""

    @classmethod
    def from_reference(cls, ref: Attention, transposed: bool = False) -> "FusedAttention":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("n_heads", "n_kv_heads", "head_dim", "n_rep"):
            setattr(fused, name, getattr(ref, name))
        fused.wqkv = fuse_linears([ref.wq, ref.wk, ref.wv], transposed)
        fused.wo, fused.cache = ref.wo, ref.cache
        return fused

    def project(self, x: torch.Tensor):
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * hd, K * hd, K * hd], dim=-1)  # views of one (B, T, (H+2K)*hd)
        return q.view(B, T, H, hd), k.view(B, T, K, hd), v.view(B, T, K, hd)


class FusedFeedForward(nn.Module):
    """SwiGLU with gate and up from one product: w13 = [W1; W3], 2F x D; then w2( silu(gate) * up )."""

    def __init__(self, ref: FeedForward, transposed: bool = False):
        super().__init__()
        self.hidden = ref.w1.out_features
        self.w13 = fuse_linears([ref.w1, ref.w3], transposed)
        self.w2 = ref.w2

    native_swiglu = False  # set by use_native_decode: silu(gate) * up in one call of llama_min's kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)  # (B, T, 2F)
        if self.native_swiglu and _native_activations(gate_up):
            return self.w2(native.swiglu(gate_up, self.hidden))  # (B, T, F) -> (B, T, D)
        gate, up = gate_up.split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


def fuse_projections(model, transposed: bool = False) -> nn.Module:
    """In every block, Attention -> FusedAttention and FeedForward -> FusedFeedForward, where the projections
    are plain nn.Linear or quantized layers that stack (int8, or int4 of one group size). transposed: store
    the fused float weights W^T (float32 CPU decoding, see "Wide layers stored transposed" above); both fused
    layers are wide."""
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        if type(att) in (Attention, FastAttention) and _stackable(att.wq, att.wk, att.wv):
            layer.attention = FusedAttention.from_reference(att, transposed)
        if type(ffn) is FeedForward and _stackable(ffn.w1, ffn.w3):
            layer.feed_forward = FusedFeedForward(ffn, transposed)
    return model


def _stackable(*modules) -> bool:
    """Float nn.Linear layers, or quantized ones that stack (quantize.can_fuse_quantized)."""
    return all(type(m) is nn.Linear for m in modules) or can_fuse_quantized(modules)
