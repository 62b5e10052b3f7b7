"""Training's memory preflight: the peak of a training step, estimated from the shapes before anything is
built, and a one-line refusal when the device has not that much free.

The peak of a step (float32 master weights; bf16 autocast needs less, so this is an upper bound):

  weights       every parameter, 4 bytes
  optimizer     for the trainable parameters: the gradient (4 bytes) and AdamW's two moments (8 bytes)
  activations   what autograd keeps per layer for the backward pass, per token of batch x seq_len:
                the norms' outputs (2 x 2 x dim + the block's input and middle), q, k, v before and after
                RoPE, k and v repeated for the query heads, the attention output before and after the
                head merge, and four hidden-size tensors of SwiGLU (w1 x, silu, w3 x, their product).
                With gradient checkpointing only each block's input is kept, plus one block recomputed.
                One more block's worth for the temporaries of the backward pass of a block.
  logits        batch x seq_len x vocab float32: the logits, the log-softmax the loss keeps, the
                gradients of both and one temporary of the backward pass (5 copies)
  work          32 MiB for the runtime's own buffers (kernels' scratch space, the autograd engine)

This is the peak of the live tensors (what torch.cuda.max_memory_allocated reports on a GPU). On a CPU the C
allocator may keep freed blocks for reuse, so a process's resident size can pass it; tests/test_train_memory.py
measures a real step with large blocks returned to the system at once and checks the estimate lies between
the measured peak and three times it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LlamaMinError
from ..model import ModelArgs
from .config import TrainConfig

FLOAT = 4  # bytes of a float32
WORK = 32 * 2**20  # the runtime's own buffers, whatever the model


@dataclass
class TrainingMemory:
    """Estimated bytes of one training step's peak, by part."""

    weights: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + WORK


def count_params(args: ModelArgs) -> int:
    """Parameters of the Transformer `args` describes (the output matrix counted once when tied)."""
    D, hd, F = args.dim, args.hd, args.ffn_hidden
    attn = D * args.n_heads * hd * 2 + D * args.kv_heads * hd * 2  # wq, wo; wk, wv
    per_layer = attn + 3 * D * F + 2 * D
    embed = args.vocab_size * D * (1 if args.tie_word_embeddings else 2)
    return args.n_layers * per_layer + embed + D


def count_lora_params(args: ModelArgs, rank: int, targets) -> int:
    """Trainable parameters of LoRA rank `rank` on the `targets` linears: r * (in + out) each, per layer."""
    from .lora import parse_targets

    D, q, kv, F = args.dim, args.n_heads * args.hd, args.kv_heads * args.hd, args.ffn_hidden
    sizes = {"wq": D + q, "wk": D + kv, "wv": D + kv, "wo": q + D, "w1": D + F, "w3": D + F, "w2": F + D}
    return args.n_layers * rank * sum(sizes[t] for t in parse_targets(targets))


def layer_floats_per_token(args: ModelArgs) -> int:
    """float32 values autograd keeps for one block, per token (see the module docstring)."""
    D, q, kv, F = args.dim, args.n_heads * args.hd, args.kv_heads * args.hd, args.ffn_hidden
    norms = 2 * (2 * D) + 2 * D                 # each norm's scaled and weighted output; block input, middle
    attention = 2 * (q + 2 * kv) + 2 * q + 2 * q  # q,k,v and after RoPE; k,v repeated; output, merged heads
    return norms + attention + 4 * F


def estimate(args: ModelArgs, cfg: TrainConfig, world: int = 1) -> TrainingMemory:
    """The peak of one training step on one process (batch_size / world windows, FSDP shards the state)."""
    n_params = count_params(args)
    trainable = count_lora_params(args, cfg.lora_rank, cfg.lora_targets) if cfg.lora_rank else n_params
    shard = world if cfg.fsdp else 1
    tokens = max(1, cfg.batch_size // world) * cfg.seq_len
    per_layer = layer_floats_per_token(args)
    if cfg.grad_checkpointing:
        kept = args.n_layers * args.dim + per_layer  # the blocks' inputs, and one block recomputed
    else:
        kept = args.n_layers * per_layer
    kept += per_layer  # the backward pass's temporaries of one block
    return TrainingMemory(weights=n_params * FLOAT // shard, optimizer=trainable * 3 * FLOAT // shard,
                          activations=tokens * (kept + 3 * args.dim) * FLOAT,
                          logits=tokens * args.vocab_size * 5 * FLOAT)


def check_training_memory(args: ModelArgs, cfg: TrainConfig, device, world: int = 1, held: int = 0) -> None:
    """Refuse, before building anything, a run whose step cannot fit the free memory of `device`.

    `held`: bytes already allocated that the model will take over (a checkpoint loaded on that device).
    """
    from ..runtime.memory import free_memory

    need = estimate(args, cfg, world)
    free = free_memory(device)
    if free is None or need.total - held <= free:
        return
    raise LlamaMinError(
        f"training needs about {human(need.total)} on {device} (weights {human(need.weights)}, gradients + "
        f"AdamW {human(need.optimizer)}, activations {human(need.activations)} and logits {human(need.logits)} "
        f"for --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}), but only {human(free + held)} is free: "
        f"{hints(cfg)}")


def hints(cfg: TrainConfig) -> str:
    """The flags that lower the peak, in one phrase."""
    out = ["lower --batch-size (and raise --grad-accum to keep the tokens per step)", "lower --seq-len"]
    if not cfg.grad_checkpointing:
        out.append("add --grad-checkpointing")
    if cfg.lora_rank:
        out.append("lower --lora-rank")
    elif cfg.init:
        out.append("train LoRA adapters only (--lora-rank 8)")
    return ", ".join(out[:-1]) + " or " + out[-1]


def human(n_bytes: float) -> str:
    """1.25 GiB, 310.0 MiB, 12.0 KiB."""
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.2f} GiB"
