"""The compiled step: one-token decode steps through torch.compile (`Llama.compile()`; step.py's third step).

Where llama_min's C step (step.NativeStep) takes a call, the compiled step leaves it there: on SmolLM2
the C step decoded faster than the compiled graph (alternating in one script on a 2-core AVX2 machine:
packed 55-69 against 36-41 tok/s, float32 26-29 against 19-21), so the graph serves only the calls it
does not take (a model whose layers the C code does not multiply by, a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import FastAttention
from .linear import dense_twin
from .step import NativeStep, ReferenceStep


# ------------------------------------------------------------------------------------------------
# A compiled one-token decode step
#
# torch.compile traces a function into one graph and generates fused kernels for it, which removes
# most of the per-op Python and dispatch cost of a small model's decode step. To get one graph that is
# reused for every position:
#   - RoPE in real arithmetic: the compiler cannot generate code for complex numbers. For pair i,
#     (x_even + j x_odd) * (cos + j sin) is  out_even = x_even cos - x_odd sin,
#                                            out_odd  = x_even sin + x_odd cos,
#     with cos, sin the real and imaginary parts of the same freqs_cis: the same rotation.
#   - the position is a tensor, not a Python int, so it is data, not part of the graph: the new key and
#     value are written with index_copy_ at that position, and the step attends over the whole cache with
#     a mask that hides the positions after it (exp(-inf) = 0: the same softmax as over [:pos+1]).
#   - the cache length is marked dynamic, so caches sized to different requests share the graph.
# ------------------------------------------------------------------------------------------------


# The default on a CPU: "freezing" folds the weights into the graph as constants, which lets inductor
# repack them for its own matrix kernels, and max-autotune times its generated kernels against the
# library's for every shape and keeps the faster. On SmolLM2 here this step ran 1.6x faster than eager
# (48-51 ms against 79 ms), where the default mode gained nothing. "cpp_wrapper" writes the code that
# calls the kernels in C++ instead of Python: a step launches hundreds of small kernels, and the packed
# SmolLM2 step ran 1.47x faster with it (55 against 38 tok/s in one measurement). Compiling takes two to
# three minutes.
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True, "cpp_wrapper": True}


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, N, hd) by cos, sin (T, hd/2) on interleaved pairs (x[2i], x[2i+1]), in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, N, hd/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class CompiledStep(ReferenceStep):
    """One-token steps through a compiled graph; every other call (prompts, scoring, no cache) goes to
    `fallback` (the step it was chosen over: step.NativeStep or step.ReferenceStep), and so do batches of
    several rows when the model's float weights are in oneDNN's layout (it multiplies 8 rows in about the
    time of one; the compiled dense kernels here took 2x longer than eager for 8 rows).

    mode None: CPU_OPTIONS on a CPU (freezing + max-autotune), torch.compile's default elsewhere; or any
    torch.compile mode. The graph is built on the first one-token call it takes (minutes on a CPU).
    """

    name = "compiled"

    @property
    def about(self) -> str:
        return f"one-token steps through torch.compile; the rest by the {self.fallback.name} step"

    def __init__(self, model, fallback=None, mode=None, backend="inductor"):
        self.model, self.fallback = model, fallback if fallback is not None else ReferenceStep(model)
        self.graph = dense_twin(model)  # the compiler cannot trace oneDNN's opaque weights: it gets dense copies
        self.cos = model.freqs_cis.real.contiguous()  # (2 * max_seq_len, hd/2) float32
        self.sin = model.freqs_cis.imag.contiguous()
        on_cpu = mode is None and backend == "inductor" and model.norm.weight.device.type == "cpu"
        self.compiled = torch.compile(self.step, mode=mode, backend=backend, fullgraph=True,
                                      options=CPU_OPTIONS if on_cpu else None)

    def unchanged_model(self):
        """The step it was chosen over's (a native step checks the model at the block's first call only)."""
        return self.fallback.unchanged_model()

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        if isinstance(self.fallback, NativeStep):  # the C step, where it takes the call: faster than the graph
            logits = self.fallback.try_step(tokens, start_pos, last_only)
            if logits is not None:
                return logits
        caches = [layer.attention.cache for layer in self.model.layers]
        several_rows_on_onednn = tokens.shape[0] > 1 and self.graph is not self.model  # oneDNN does rows better
        # `dynamic` RoPE scaling changes the table with the length: the graph holds one fixed table
        dynamic_rope = self.model.params.rope_scaling_type == "dynamic"
        if tokens.shape[1] != 1 or any(c is None for c in caches) or several_rows_on_onednn or dynamic_rope:
            return self.fallback(tokens, start_pos, last_only)
        if start_pos >= caches[0].k.shape[1]:
            raise ValueError(f"position {start_pos} is past the KV cache of {caches[0].k.shape[1]}")
        ks, vs = [c.k for c in caches], [c.v for c in caches]
        for t in ks + vs:
            torch._dynamo.maybe_mark_dynamic(t, 1)  # one graph for every cache length
        tokens = tokens.new_empty(tokens.shape).copy_(tokens)  # fresh strides: a slice's would be guarded
        if self.cos.device != tokens.device:
            self.cos, self.sin = self.cos.to(tokens.device), self.sin.to(tokens.device)
        pos = torch.tensor([start_pos], device=tokens.device)
        return self.compiled(tokens, pos, ks, vs)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, ks: list, vs: list) -> torch.Tensor:
        """tokens (B, 1) at position pos (a 1-element tensor) -> float32 logits (B, 1, V); writes the caches."""
        m = self.graph
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # (1, hd/2)
        visible = (torch.arange(ks[0].shape[1], device=tokens.device) <= pos).view(1, 1, 1, -1)  # (1,1,1,S)
        h = m.tok_embeddings(tokens)  # (B, 1, D)
        for layer, k_cache, v_cache in zip(m.layers, ks, vs):
            x = layer.attention_norm(h)
            h = h + self.attend(layer.attention, x, pos, cos, sin, k_cache, v_cache, visible)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h)).float()

    @staticmethod
    def attend(att, x, pos, cos, sin, k_cache, v_cache, visible):
        """One layer's attention for one token; GQA as in FastAttention._decode_gqa, the cache (B, S, K, hd)."""
        B = x.shape[0]
        q, k, v = att.project(x) if hasattr(att, "project") else FastAttention.project(att, x)
        q, k = rope_real(q, cos, sin), rope_real(k, cos, sin)
        k_cache = k_cache[:B]
        v_cache = v_cache[:B]
        k_cache.index_copy_(1, pos, k)
        v_cache.index_copy_(1, pos, v)
        q = q.view(B, att.n_kv_heads, att.n_rep, att.head_dim)  # the n_rep query heads of each KV head
        out = F.scaled_dot_product_attention(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=visible)
        return att.wo(out.reshape(B, 1, -1))  # (B, K, n_rep, hd) -> (B, 1, H*hd)
