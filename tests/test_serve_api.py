"""`llama-min serve` driven as a client meets it: a real server (a subprocess on a free localhost port, the
default model, started once for the module) and the official `openai` Python client.

Checked: the routes and OpenAI's shapes, streamed answers equal to plain ones, completions equal to
`llama-min generate`, stop strings, max_tokens, seed, logprobs, usage with cached prompt tokens; every bad
request a 4xx with OpenAI's error body while the server keeps serving; a full queue a 429 with Retry-After;
a client that hangs up frees its row; the API key; SIGTERM ends the open streams and exits 0; the command
without the serve extra, on a busy port, and its --help (no torch, starlette or uvicorn imported).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

ENV = dict(os.environ, OMP_NUM_THREADS="1")
KEY = "test-key-31"
WINDOW = 512
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class Server:
    """A `llama-min serve` subprocess; stderr is read into `lines` by a thread (no pipe ever fills up)."""

    def __init__(self, *flags):
        argv = [sys.executable, "-m", "llama_min", "serve", "--port", "0", "-t", "1", *flags]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
        self.lines = []
        self.port = self._wait_for_port()
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _wait_for_port(self) -> int:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                return int(found.group(1))
        raise AssertionError(f"the server did not start: {''.join(self.lines)}")

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body, key=KEY):
        """POST raw bytes (or a JSON-able object): (status, parsed JSON body, headers)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.load(r), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.load(e), e.headers

    def wait(self, timeout=20) -> int:
        """The exit code, once stderr is read to its end."""
        code = self.proc.wait(timeout)
        self.drain.join(timeout)
        return code

    def stop(self, timeout=20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


@pytest.fixture(scope="module")
def server(smollm2_path):
    """One server for the module: 2 rows, 1 waiting request at most, a 512-token window, an API key."""
    s = Server("-m", str(smollm2_path), "-c", str(WINDOW), "--max-batch", "2", "--max-queue", "1",
               "--api-key", KEY)
    yield s
    assert s.stop() == 0, "".join(s.lines)
    assert "Traceback" not in "".join(s.lines), "".join(s.lines)


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from llama_min import load_tokenizer

    return load_tokenizer(smollm2_path)


def wait_until(check, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------------------- answers


@pytest.mark.assets
def test_models_lists_the_checkpoint(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"] and models[0].object == "model"


@pytest.mark.assets
def test_chat_streamed_deltas_join_to_the_plain_answer(server, tok):
    client = server.client()
    plain = client.chat.completions.create(model="any", messages=CHAT, max_tokens=24, temperature=0)
    answer = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant" and answer.strip()
    assert plain.usage.prompt_tokens == len(tok.encode_dialog(CHAT))  # the chat template, as `chat` uses it
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="any", messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix is reused


@pytest.mark.assets
def test_completion_equals_generate_greedy(server, smollm2_path):
    prompt = "The capital of France is"
    r = subprocess.run([sys.executable, "-m", "llama_min", "generate", "-m", str(smollm2_path), "-p", prompt,
                        "--temperature", "0", "-n", "16", "-c", str(WINDOW), "-t", "1", "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    out = server.client().completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == r.stdout[:-1]  # generate adds a newline
    assert out.usage.prompt_tokens == 5


@pytest.mark.assets
def test_stop_string_cuts_the_text_and_says_stop(server):
    client, prompt = server.client(), "Count: one, two, three, four, five,"
    full = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0).choices[0]
    assert "," in full.text
    cut = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=[","])
    assert cut.choices[0].text == full.text.split(",")[0] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=",",
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


@pytest.mark.assets
def test_max_tokens_ends_with_length(server):
    out = server.client().chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


@pytest.mark.assets
def test_seed_repeats_a_sampled_answer(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model="any", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1


@pytest.mark.assets
def test_logprobs(server):
    client = server.client()
    out = client.chat.completions.create(model="any", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens and "".join(e.token for e in entries) == \
        out.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0 and e.top_logprobs[0].token == e.token  # greedy
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    done = client.completions.create(model="any", prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2).choices[0].logprobs
    assert len(done.tokens) == len(done.token_logprobs) == len(done.top_logprobs) == 4
    assert done.text_offset[0] == 0 and all(len(t) == 2 for t in done.top_logprobs)


# ------------------------------------------------------------------------------------------- mistakes


BAD_REQUESTS = [  # (route, body, the field the error names)
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 5}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": -1}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 100000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, "messages"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
]


@pytest.mark.assets
@pytest.mark.parametrize("route,body,param", BAD_REQUESTS)
def test_bad_request_is_a_400_naming_the_field(server, route, body, param):
    status, answer, _ = server.post(route, body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert server.health()["status"] == "ok"


@pytest.mark.assets
def test_a_prompt_longer_than_the_window_says_so(server):
    status, answer, _ = server.post("/v1/completions", {"prompt": "hi " * 600})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert f"window is {WINDOW} tokens" in answer["error"]["message"]


@pytest.mark.assets
def test_unknown_route_and_method_get_the_error_shape(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(server.url + path, method=method), timeout=30)
        assert e.value.code == status and "message" in json.load(e.value)["error"]


@pytest.mark.assets
def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").models.list()
    assert e.value.status_code == 401
    status, answer, _ = server.post("/v1/completions", {"prompt": "hi"}, key="")
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert server.health()["status"] == "ok"  # /health needs no key


# ------------------------------------------------------------------------------------------- under load


def open_stream(client, n_tokens=400):
    """A streamed completion that runs for a while (counting on: no early end); returns the stream after its
    first chunk."""
    stream = client.completions.create(model="any", prompt="1, 2, 3, 4, 5, 6,", max_tokens=n_tokens,
                                       temperature=0, stream=True)
    next(iter(stream))
    return stream


@pytest.mark.assets
def test_client_hanging_up_frees_its_row(server):
    stream = open_stream(server.client())
    assert server.health()["running"] == 1
    stream.close()
    assert wait_until(lambda: server.health()["running"] == 0 and server.health()["open_requests"] == 0), \
        server.health()
    assert server.client().completions.create(model="any", prompt="Hi", max_tokens=2).choices[0].text is not None


@pytest.mark.assets
def test_client_hanging_up_on_a_plain_request_frees_its_row(server):
    """Not streamed: the server notices the closed connection while the answer is being written."""
    body = json.dumps({"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 480, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert wait_until(lambda: server.health()["running"] == 1)
    assert wait_until(lambda: server.health()["running"] == 0 and server.health()["open_requests"] == 0, 3), \
        server.health()


@pytest.mark.assets
def test_full_queue_is_a_429_with_retry_after(server):
    client, streams = server.client(), []
    try:
        for running in (1, 2):  # both rows busy
            streams.append(open_stream(client))
            assert wait_until(lambda: server.health()["running"] == running)
        waiting = client.completions.with_raw_response.create(model="any", prompt="Hi", max_tokens=2, stream=True)
        assert wait_until(lambda: server.health()["waiting"] == 1)  # the queue's one place is taken
        status, answer, headers = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 429 and answer["error"]["type"] == "rate_limit_error" and int(headers["Retry-After"]) >= 1
    finally:
        for s in streams:
            s.close()
    assert "".join(c.choices[0].text for c in waiting.parse())  # the waiting one got its turn
    assert wait_until(lambda: server.health()["running"] == 0)


# ------------------------------------------------------------------------------------------- the process


@pytest.mark.assets
def test_sigterm_ends_open_streams_and_exits_0(smollm2_path):
    s = Server("-m", str(smollm2_path), "-c", "256")
    stream = open_stream(s.client(key="none"), n_tokens=200)
    s.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    chunks = list(stream)  # the stream ends cleanly ([DONE]) instead of breaking off
    assert chunks and chunks[-1].choices[0].finish_reason == "abort"
    assert s.wait(15) == 0 and time.monotonic() - start < 10
    assert "Traceback" not in "".join(s.lines) and s.lines[-1] == "stopped\n", "".join(s.lines)


def test_serve_without_the_extra_says_what_to_install():
    code = ("import sys\nsys.modules['starlette'] = None\nfrom llama_min.cli import main\n"
            "sys.exit(main(['serve']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: llama-min serve needs starlette: pip install 'llama_min[serve]'"], r.stderr


def test_busy_port_is_one_line_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llama_min", "serve", "--port", str(port)], capture_output=True,
                           text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"], r.stderr


def test_bad_flag_is_one_line():
    r = subprocess.run([sys.executable, "-m", "llama_min", "serve", "--max-batch", "0"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == ["error: --max-batch 0: expected an integer in [1, inf]"]


def test_help_imports_no_torch_nor_web_stack():
    code = ("import sys\nfrom llama_min.cli import main\ncode = main(['serve', '--help'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'starlette', 'uvicorn')), "
            "file=sys.stderr)\nsys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and "/v1/chat/completions" in r.stdout and r.stderr.strip() == "[]", r.stderr
