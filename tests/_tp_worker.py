"""One rank of a tensor-parallel test run (started by tests/test_tensor_parallel.py, torchrun or by hand).

    python tests/_tp_worker.py OUT_DIR JOB [JOB ...]

JOB is `rss:<path>` / `rss1:<path>` (peak memory of a tensor-parallel / one-process load, in rss<rank>.json),
`mem:<json of tiny_model overrides>` (a random tiny model built identically on every rank, then
split in memory) or `ckpt:<path>` (Llama.build(path, tensor_parallel=True), the rank reading its slice;
the tokenizer is <OUT_DIR>/tokenizer.json). For job i rank 0 writes OUT_DIR/job<i>.pt: full-forward logits,
greedy and seeded-sampled generations (ragged batch, with logprobs). `hang` keeps generating forever
(the kill test). A failure prints `error: <message>` on rank 0 only and exits 2 on every rank.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42, 8], [7, 1, 64, 23]]


class NoTokenizer:
    """Generation from token ids needs only the stop set and the vocabulary size (no masking here)."""

    stop_ids: set = set()
    n_words = 1 << 30


def run_job(job: str):
    from _tiny import rand_tokens, tiny_model

    import torch.distributed as dist
    from llama_min import Llama
    from llama_min.parallel.group import init_distributed
    from llama_min.parallel.sharded import tensor_parallelize

    if job.startswith("mem:") or job == "hang":
        init_distributed(torch.device("cpu"))
        model = tensor_parallelize(tiny_model(**json.loads(job[4:] or "{}")))
        llama = Llama(model, NoTokenizer(), max_seq_len=64, max_batch_size=2)
    else:
        out = Path(sys.argv[1])
        llama = Llama.build(job[5:], out / "tokenizer.json", max_seq_len=64, max_batch_size=2, device="cpu",
                            dtype=torch.float32, tensor_parallel=True, optimize=os.environ.get("TP_OPTIMIZE") == "1")
    vocab = llama.model.vocab_size
    with torch.inference_mode():
        logits = llama.model(rand_tokens(2, 12, vocab=vocab))
    greedy = llama.generate(PROMPTS, max_gen_len=10, temperature=0, logprobs=True)
    sampled = llama.generate(PROMPTS, max_gen_len=10, temperature=1.0, top_p=0.95, seed=7)
    while job == "hang":  # the kill test: collectives forever
        (Path(sys.argv[1]) / f"generating{dist.get_rank()}").touch()
        llama.generate(PROMPTS, max_gen_len=10, temperature=0)
    return dict(logits=logits, greedy=greedy, sampled=sampled)


def memory_kib(key: str) -> int:
    """A /proc/self/status line in KiB: VmRSS now, VmHWM the peak so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_job(job: str):
    """`rss:<path>` (tensor-parallel) or `rss1:<path>` (one process): peak RSS of load + one forward, in KiB."""
    from llama_min import Llama

    import llama_min.parallel.slicing  # noqa: F401  (code is not weights: import before measuring)
    from llama_min.parallel.group import init_distributed
    from llama_min.text.tokenizer import load_tokenizer

    from _tiny import tiny_model

    kind, path = job.split(":", 1)
    load_tokenizer(Path(sys.argv[1]) / "tokenizer.json")
    with torch.inference_mode():  # torch's one-time kernel and library set-up (~80 MB here) is not weights
        tiny_model()(torch.tensor([[1, 2, 3]]))
    with torch.device("meta"):  # (the first module built on the meta device loads ~70 MB of code)
        torch.nn.Embedding(8, 4)
    if kind == "rss":  # the process group is not weights either
        init_distributed(torch.device("cpu"))
        torch.distributed.all_reduce(torch.ones(4))
    before = memory_kib("VmRSS")
    llama = Llama.build(path, Path(sys.argv[1]) / "tokenizer.json", max_seq_len=64, max_batch_size=1, device="cpu",
                        dtype=torch.float32, optimize=False, tensor_parallel=kind == "rss")
    with torch.inference_mode():  # touch every weight once, as generating does
        llama.model(torch.tensor([[1, 2, 3]]))
    return dict(before=before, peak=memory_kib("VmHWM"))


def main() -> int:
    import torch.distributed as dist
    from llama_min.parallel.group import is_rank0, leave_process_group

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    try:
        for i, job in enumerate(sys.argv[2:]):
            if job.startswith("rss"):
                result = rss_job(job)
                rank = dist.get_rank() if dist.is_initialized() else 0
                (out / f"rss{rank}.json").write_text(json.dumps(result))
                continue
            result = run_job(job)
            if is_rank0():
                torch.save(result, out / f"job{i}.pt")
    except (ValueError, OSError, RuntimeError) as e:
        if is_rank0():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        leave_process_group()  # every rank done before any tears the group down
    return 0


if __name__ == "__main__":
    sys.exit(main())
