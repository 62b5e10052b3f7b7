"""Measure `llama-min serve` as clients see it: streamed tokens/s with 1 and with N concurrent clients, time to
first token, and the time to first token of a conversation's later turns behind a long system prompt (prompt
reuse) against its first turn.

Starts the server itself (a fresh process on a free localhost port, the default model unless --ckpt), talks to
it with the official `openai` client (pip install 'llama_min[dev]' or 'openai'), prints one line per
measurement and, with --json, writes them. A benchmark, not a test: run it on an otherwise idle machine.

  python scripts/serve_bench.py                    # default model, 8 clients, 128 tokens each, -t 2
  python scripts/serve_bench.py --ckpt model.gguf --clients 16 --tokens 64 --threads 4
  python scripts/serve_bench.py --soak 200         # 200 requests with random hang-ups and bad bodies
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


def server_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def raw_post(port: int, body: bytes) -> int:
    """POST bytes as they are (a body no client library would send): the HTTP status."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=120).status
    except urllib.error.HTTPError as e:
        return e.code


def one_soak_request(client, port: int, rng) -> str:
    """A random request: a whole answer, a stream the client hangs up on, a malformed body or a bad field.
    Returns what happened; raises when the server answered wrongly."""
    import openai

    kind = rng.choice(["answer", "hang up", "bad json", "bad field"])
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    if kind == "answer":
        r = client.chat.completions.create(model="any", messages=messages, max_tokens=rng.randint(1, 24))
        assert r.choices[0].finish_reason in ("stop", "length"), r
    elif kind == "hang up":
        stream = client.chat.completions.create(model="any", messages=messages, max_tokens=64, stream=True)
        for i, _ in enumerate(stream):
            if i >= rng.randint(0, 4):
                break
        stream.close()
    elif kind == "bad json":
        status = raw_post(port, rng.choice([b"{", b"not json", b"[]", b'{"messages": 5}']))
        assert status == 400, status
    else:
        try:
            client.chat.completions.create(model="any", messages=messages, temperature=-1)
            raise AssertionError("temperature -1 was accepted")
        except openai.BadRequestError:
            pass
    return kind


def soak(args) -> dict:
    """N random requests from 8 threads: every one answered as it should be, nothing left running, the
    server's RSS after warm-up and at the end, and the same greedy answer before and after."""
    import random
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    port = free_port()
    server = start_server(args, port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        probe = [{"role": "user", "content": "What is the capital of France?"}]
        before = client.chat.completions.create(model="any", messages=probe, max_tokens=32, temperature=0)
        rngs = [random.Random(i) for i in range(args.soak)]
        with ThreadPoolExecutor(8) as pool:
            warm = list(pool.map(lambda r: one_soak_request(client, port, r), rngs[:20]))
            time.sleep(1)
            rss_warm = server_rss_mib(server.pid)
            kinds = warm + list(pool.map(lambda r: one_soak_request(client, port, r), rngs[20:]))
        time.sleep(1)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
        rss_end = server_rss_mib(server.pid)
        after = client.chat.completions.create(model="any", messages=probe, max_tokens=32, temperature=0)
        same = before.choices[0].message.content == after.choices[0].message.content
        out = dict(requests=len(kinds), kinds={k: kinds.count(k) for k in sorted(set(kinds))}, health=health,
                   rss_after_warmup_mib=rss_warm, rss_end_mib=rss_end, same_greedy_answer=same)
        print(f"soak: {len(kinds)} requests {out['kinds']}, all answered as expected; /health at the end "
              f"{health}; server RSS {rss_warm:.0f} MiB after 20 requests, {rss_end:.0f} MiB at the end "
              f"({rss_end - rss_warm:+.0f} MiB); the same greedy answer before and after: {same}")
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", "-m", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    p.add_argument("--turns", type=int, default=3, help="turns of the long-system-prompt conversation (default 3)")
    p.add_argument("--threads", "-t", type=int, default=2, help="the server's torch threads (default 2)")
    p.add_argument("--soak", type=int, default=0, metavar="N", help="instead: N random requests (answers, streams "
                   "hung up on, malformed bodies, bad fields) from 8 threads; checks nothing is lost or left running, "
                   "the server's RSS, and the greedy answer before and after")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.soak:
        results = soak(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0
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
