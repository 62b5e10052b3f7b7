"""Measure `llama-min serve` as clients see it: streamed tokens/s with 1 and with N concurrent clients, time to
first token, and the time to first token of a conversation's later turns behind a long system prompt (prompt
reuse) against its first turn.

Starts the server itself (a fresh process on a free localhost port, the default model unless --ckpt), talks to
it with the official `openai` client (pip install 'llama_min[dev]' or 'openai'), prints one line per
measurement and, with --json, writes them. A benchmark, not a test: run it on an otherwise idle machine.

  python scripts/serve_bench.py                    # default model, 8 clients, 128 tokens each, -t 2
  python scripts/serve_bench.py --ckpt model.gguf --clients 16 --tokens 64 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Describe the water cycle to a child.", "List some uses of copper and why.",
           "Tell me about the history of the printing press.", "What makes a good cup of tea?",
           "Describe a walk through a forest in autumn.", "How do bees make honey?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, cache_mb=None) -> subprocess.Popen:
    """`llama-min serve` in a fresh process; returns once /health answers."""
    import urllib.request

    cmd = [sys.executable, "-m", "llama_min", "serve", "--port", str(port), "-t", str(args.threads),
           "--max-batch", str(max(args.clients, 1)), "--quiet"]
    cmd += ["-m", args.ckpt] if args.ckpt else []
    cmd += ["--cache-mb", str(cache_mb)] if cache_mb is not None else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not answer /health within 300 s")


def stream_chat(client, messages, max_tokens: int) -> dict:
    """One streamed chat completion: time to the first content chunk, total time, tokens (usage), text."""
    start, first, text, usage = time.perf_counter(), None, [], None
    stream = client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0) or 0
    return dict(ttft=(first or end) - start, seconds=end - start, tokens=usage.completion_tokens,
                prompt_tokens=usage.prompt_tokens, cached=cached, text="".join(text))


def concurrent(client, n: int, max_tokens: int) -> dict:
    """n clients at once, each one streamed chat: total tokens / wall seconds, and each time to first token."""
    results, threads = [None] * n, []

    def run(i):
        results[i] = stream_chat(client, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens)

    start = time.perf_counter()
    for i in range(n):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return dict(clients=n, tokens=tokens, wall=wall, tok_s=tokens / wall,
                ttft=statistics.median(r["ttft"] for r in results), texts=[r["text"] for r in results])


def long_system_prompt(n_words: int = 710) -> str:
    """A system prompt of roughly 900 tokens (a fixed, plain English text)."""
    base = ("You are a careful assistant for a public library. Answer questions about opening hours, borrowing "
            "rules, events and the catalogue. Be brief, polite and precise; when unsure, say so and suggest "
            "asking a librarian. ")
    words = (base * (n_words // len(base.split()) + 1)).split()[:n_words]
    return " ".join(words)


def conversation(client, turns: int, max_tokens: int) -> list:
    """A chat that resends its whole history each turn (as OpenAI clients do): each turn's time to first token."""
    messages = [{"role": "system", "content": long_system_prompt()}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t + 1}: {PROMPTS[t % len(PROMPTS)]}"})
        r = stream_chat(client, messages, max_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        out.append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", "-m", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    p.add_argument("--turns", type=int, default=3, help="turns of the long-system-prompt conversation (default 3)")
    p.add_argument("--threads", "-t", type=int, default=2, help="the server's torch threads (default 2)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from openai import OpenAI

    results = {}
    for label, cache_mb in (("cache", None), ("no cache", 0)):
        port = free_port()
        server = start_server(args, port, cache_mb)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            stream_chat(client, [{"role": "user", "content": "Hello"}], 8)  # warm up
            if label == "cache":
                one = concurrent(client, 1, args.tokens)
                many = concurrent(client, args.clients, args.tokens)
                results["one"], results["many"] = one, many
                print(f"1 client: {one['tok_s']:.1f} tok/s, time to first token {one['ttft'] * 1000:.0f} ms")
                print(f"{args.clients} clients: {many['tok_s']:.1f} tok/s in all ({many['tok_s'] / one['tok_s']:.2f}x "
                      f"one client), median time to first token {many['ttft'] * 1000:.0f} ms")
            turns = conversation(client, args.turns, 32)
            results[f"conversation ({label})"] = turns
            first = turns[0]["ttft"]
            later = ", ".join(f"{r['ttft'] * 1000:.0f} ms ({r['ttft'] / first:.2f}x, {r['cached']} of "
                              f"{r['prompt_tokens']} prompt tokens cached)" for r in turns[1:])
            print(f"conversation behind a {turns[0]['prompt_tokens']}-token prompt ({label}): first turn "
                  f"{first * 1000:.0f} ms to first token; later turns {later}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
