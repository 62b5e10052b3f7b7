#!/usr/bin/env python
"""Training speed: llama_min vs transformers' LlamaForCausalLM, same shape, same process, interleaved rounds.

One training step = forward, cross-entropy over every position, backward, AdamW step. Each round runs every
candidate for --steps timed steps (after one untimed warm-up step per candidate); the report gives tokens/s
per candidate (median over rounds) and, per round, the ratio to transformers float32. On a shared machine
other processes wreck 2-thread timings: each sample records the CPU share other processes took while it ran
(from /proc/stat), and samples above --max-other are reported but left out of the medians when clean ones exist.

Examples:
  python scripts/train_bench.py                        # stories15M shape, seq 256, batch 8, fp32 and bf16
  python scripts/train_bench.py --threads 1 --rounds 5
  python scripts/train_bench.py --config tiny --seq-len 128 --batch-size 4 --no-hf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None off Linux."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        mine = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        return sum(fields) - fields[3] - fields[4], int(mine[11]) + int(mine[12])
    except OSError:
        return None


def other_share(before, after, seconds: float) -> float:
    """Fraction of the machine's CPU time used by other processes between two cpu_ticks() readings."""
    if before is None or after is None or seconds <= 0:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    busy_other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, busy_other / hz / (seconds * os.cpu_count()))


def ours(args_dict: dict):
    from llama_min import ModelArgs, Transformer
    from llama_min.train.loop import init_weights

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_dict(args_dict))
    init_weights(model)
    return model.train(), lambda x: model(x)


def theirs(args_dict: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_min import ModelArgs

    a = ModelArgs.from_dict(args_dict)
    cfg = LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_hidden, num_hidden_layers=a.n_layers,
                      num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab_size,
                      rms_norm_eps=a.norm_eps, max_position_embeddings=a.max_seq_len,
                      tie_word_embeddings=a.tie_word_embeddings, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": a.rope_theta})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    return model.train(), lambda x: model(input_ids=x).logits


def make_step(model, forward, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def print_summary(samples: list, names: list, a) -> None:
    """Median tok/s per candidate over the clean samples (all of them when some candidate has none clean)."""
    clean = [s for s in samples if s["other_cpu_share"] <= a.max_other]
    use = clean if {s["name"] for s in clean} == set(names) else samples
    ref = "transformers fp32" if not a.no_hf else "llama_min fp32"
    print(f"\n{'candidate':28s} {'tok/s':>8s} {'tok/CPU-s':>10s} {'vs ' + ref:>22s}  "
          f"({len(use)} of {len(samples)} samples{'' if use is clean else ', none clean: all kept'})")
    for name in names:
        mine = [s for s in use if s["name"] == name]
        ratios = [s["tok_s"] / t["tok_s"] for s in mine for t in use if t["name"] == ref and t["round"] == s["round"]]
        ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        print(f"{name:28s} {statistics.median(s['tok_s'] for s in mine):8.0f} "
              f"{statistics.median(s['tok_per_cpu_s'] for s in mine):10.0f} {ratio:>22s}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="stories15M", help="model config (name in configs/ or path); default stories15M")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per candidate per round (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-bf16", action="store_true", help="float32 only")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--max-other", type=float, default=0.05, help="drop samples where other processes used more "
                   "than this share of the CPUs (default 0.05)")
    p.add_argument("--json", type=Path, help="also write the raw samples here")
    a = p.parse_args(argv)
    from llama_min.train.config import read_json_file, resolve_model_config

    if a.threads:
        torch.set_num_threads(a.threads)
    args_dict = read_json_file(resolve_model_config(a.config), "model config")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args_dict["vocab_size"], (a.batch_size, a.seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    builders = {"llama_min": ours} | ({} if a.no_hf else {"transformers": theirs})
    cands = {}
    for name, build in builders.items():
        for bf16 in [False] + ([] if a.no_bf16 else [True]):
            model, fwd = build(args_dict)
            cands[f"{name} {'bf16-autocast' if bf16 else 'fp32'}"] = make_step(model, fwd, bf16)
    n_tok = a.batch_size * a.seq_len
    print(f"shape {a.config} (seq {a.seq_len}, batch {a.batch_size}, AdamW), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}", file=sys.stderr)
    for step in cands.values():  # warm-up (allocations, oneDNN primitive caches)
        step(x, y)

    samples = []
    for r in range(a.rounds):
        for name, step in cands.items():
            t0, c0, k0 = time.perf_counter(), time.process_time(), cpu_ticks()
            for _ in range(a.steps):
                step(x, y)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            other = other_share(k0, cpu_ticks(), wall)
            samples.append({"round": r, "name": name, "tok_s": n_tok * a.steps / wall,
                             "tok_per_cpu_s": n_tok * a.steps / cpu, "other_cpu_share": round(other, 3)})
            print(f"round {r} {name:28s} {samples[-1]['tok_s']:8.0f} tok/s  {samples[-1]['tok_per_cpu_s']:8.0f} "
                  f"tok/CPU-s  others {other:5.1%}", file=sys.stderr)

    print_summary(samples, list(cands), a)
    if a.json:
        a.json.write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
