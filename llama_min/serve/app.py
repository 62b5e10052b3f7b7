"""The HTTP side of `llama-min serve`: OpenAI's routes and JSON shapes over the batching engine (engine.py).

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health. A request body is
checked field by field (requests.py) before anything reaches the engine; every mistake a client can make is
a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and the server keeps serving.

One request becomes one engine `Request`; its `Handle` yields one TokenEvent per new token and a DoneEvent.
Here those tokens become text: decoded as a stream (whole characters only), searched for the request's
stop strings (matched on the text, as `generate --stop` does; a match cancels the request in the engine), and
sent either as one JSON answer or as server-sent events (`data: {...}` chunks, then `data: [DONE]`).

A client that hangs up frees its batch row at once (the handle is cancelled). On SIGTERM/SIGINT the server
stops accepting connections, cancels the requests still running (their streams end with finish_reason
"abort" and `[DONE]`) and returns.

Starlette builds the app and uvicorn serves it: both come with `pip install 'llama_min[serve]'`, and only the
serve command imports this module.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import time
from typing import AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..decoding.stops import StopStrings
from ..errors import LlamaMinError
from .engine import DoneEvent, QueueFull
from .requests import ApiError, Job, parse_chat, parse_completion

RETRY_AFTER_S = 1  # what a 429 (queue full) tells the client to wait


class Api:
    """The server's state: the engine, the tokenizer, the model's id and window, the open requests.

    engine: a started Engine; tok: its tokenizer; model_id: the name /v1/models lists;
    window: the context window in tokens (prompt + completion); api_key: required as a Bearer token when set.
    """

    def __init__(self, engine, tok, model_id: str, window: int, api_key: Optional[str] = None):
        self.engine, self.tok, self.model_id, self.window, self.api_key = engine, tok, model_id, window, api_key
        self.created = int(time.time())
        self.open: set = set()  # handles of the requests being answered
        self.closing = False

    def begin_shutdown(self) -> None:
        """Refuse new requests (503) and cancel the open ones: their streams end at once, cleanly."""
        self.closing = True
        for handle in list(self.open):
            handle.cancel()

    def check_key(self, request: HttpRequest) -> None:
        """With an API key set, `Authorization: Bearer KEY` is required (401 otherwise)."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError("invalid or missing API key: send 'Authorization: Bearer KEY'", status=401,
                           kind="authentication_error", code="invalid_api_key")

    def submit(self, job: Job) -> "Answer":
        """Hand a checked job to the engine; a full queue is a 429, a closing server a 503."""
        if self.closing:
            raise ApiError("the server is shutting down", status=503, kind="server_error")
        answer = Answer()
        try:
            answer.handle = self.engine.submit(job.request, on_event=answer.on_event)
        except QueueFull:
            raise ApiError("too many requests are waiting: retry shortly", status=429, kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except LlamaMinError as e:  # the engine refused the request (it checks what it runs)
            raise ApiError(str(e)) from None
        self.open.add(answer.handle)
        return answer

    def health(self) -> dict:
        """Liveness and load: requests running in the batch, waiting for a row, open on this server."""
        return {"status": "shutting_down" if self.closing else "ok", "model": self.model_id,
                "running": self.engine.running, "waiting": self.engine.waiting, "open_requests": len(self.open)}


class Answer:
    """One submitted request: its engine Handle and the asyncio queue its events arrive in. The engine calls
    `on_event` from its own thread; the event is handed to the event loop's thread (call_soon_threadsafe)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None

    def on_event(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    async def events(self) -> AsyncIterator:
        """The events, awaited (cancellable at any moment: a client hung up); ends after the DoneEvent. Left
        early, the request is cancelled in the engine (its row is freed at the next step)."""
        done = False
        try:
            while not done:
                event = await self.queue.get()
                done = isinstance(event, DoneEvent)
                yield event
        finally:
            if not done:
                self.handle.cancel()


# ------------------------------------------------------------------------------------------- routes


def create_app(api: Api) -> Starlette:
    """The ASGI app over `api` (Starlette): the four routes and one error shape for every failure."""

    async def models(request: HttpRequest):
        api.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": api.model_id, "object": "model", "created": api.created, "owned_by": "llama_min"}]})

    async def health(request: HttpRequest):
        return JSONResponse(api.health())

    async def chat_completions(request: HttpRequest):
        api.check_key(request)
        return await answer(request, parse_chat(await read_json(request), api.tok, api.window))

    async def completions(request: HttpRequest):
        api.check_key(request)
        return await answer(request, parse_completion(await read_json(request), api.tok, api.window))

    async def answer(request: HttpRequest, job: Job):
        submitted = api.submit(job)
        if job.stream:
            return StreamingResponse(stream_chunks(api, job, submitted), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await whole_answer(api, job, submitted, request))
        finally:
            api.open.discard(submitted.handle)

    routes = [Route("/v1/models", models), Route("/health", health),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.api = api
    return app


async def read_json(request: HttpRequest) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(f"the body must be a JSON object, not {type(data).__name__}")
    return data


def error_response(status: int, message: str, kind: str, param=None, code=None, headers=None) -> JSONResponse:
    """OpenAI's error body."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error(request: HttpRequest, e: ApiError) -> Response:
    return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)


async def http_error(request: HttpRequest, e: HTTPException) -> Response:
    """Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's error shape."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(e.status_code, message.get(e.status_code, e.detail), "invalid_request_error",
                          headers=e.headers)


async def server_error(request: HttpRequest, e: Exception) -> Response:
    """A bug: a 500 in the same shape (uvicorn logs the traceback)."""
    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# ----------------------------------------------------------------------------- from tokens to text


class Piece:
    """Text that is safe to send now, and the logprob entries of the tokens that made it."""

    def __init__(self, text: str, logprobs: list):
        self.text, self.logprobs = text, logprobs


class Outcome:
    """How a request ended: finish_reason and the usage counts."""

    finish_reason = "abort"
    prompt_tokens = cached_tokens = completion_tokens = 0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


async def pieces(api: Api, job: Job, answer: Answer, outcome: Outcome) -> AsyncIterator[Piece]:
    """The handle's tokens as text pieces (stop strings applied); fills `outcome` at the end."""
    tok = api.tok
    shown: list = []
    texts = StopStrings(tok, job.stops, 1, on_text=lambda row, text: shown.append(text))
    stopped, pending = False, []
    async for event in answer.events():
        if isinstance(event, DoneEvent):
            if not stopped:
                texts.finish(0)
            outcome.finish_reason = "stop" if stopped else event.finish_reason
            outcome.prompt_tokens, outcome.cached_tokens = event.prompt_tokens, event.cached_tokens
            outcome.completion_tokens = event.completion_tokens
            break
        if stopped:  # (a stop id never comes: the engine ends the request on it and does not send it)
            continue
        if texts.push(0, event.token_id):
            stopped = True
            answer.handle.cancel()  # the stop string is on the text: free the row now
        elif job.logprobs is not None:  # (the token that completed a stop string is left out, as OpenAI does)
            pending.append(event)
        if shown:
            yield Piece("".join(shown), pending)
            shown.clear()
            pending = []
    if shown or pending:
        yield Piece("".join(shown), pending)


# ----------------------------------------------------------------------------------- the answers


async def whole_answer(api: Api, job: Job, answer: Answer, request: HttpRequest) -> dict:
    """The non-streamed answer; a client that hangs up while waiting cancels the request."""
    watcher = asyncio.create_task(cancel_when_gone(request, answer.handle))
    outcome, text, logprobs = Outcome(), [], []
    try:
        async for piece in pieces(api, job, answer, outcome):
            text.append(piece.text)
            logprobs += piece.logprobs
    finally:
        watcher.cancel()
    shape = job.shape(api)
    return shape.whole("".join(text), logprobs, outcome)


async def cancel_when_gone(request: HttpRequest, handle) -> None:
    """Wait for the client to disconnect (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def stream_chunks(api: Api, job: Job, answer: Answer) -> AsyncIterator[str]:
    """Server-sent events: a first chunk, one chunk per piece of text, the finish chunk, the usage chunk
    (stream_options.include_usage), `[DONE]`. Cancelled (client gone), it cancels the handle."""
    shape, outcome = job.shape(api), Outcome()
    try:
        for chunk in shape.opening():
            yield sse(chunk)
        async for piece in pieces(api, job, answer, outcome):
            yield sse(shape.delta(piece))
        yield sse(shape.finish(outcome))
        if job.include_usage:
            yield sse(shape.usage_chunk(outcome))
        yield "data: [DONE]\n\n"
    finally:
        api.open.discard(answer.handle)


def sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------- the server


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or an OSError naming the address. Connections are
    refused until run_server listens on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(app: Starlette, sock: socket.socket, on_ready=None, log_level: str = "warning") -> None:
    """Serve `app` on `sock` with uvicorn until SIGTERM/SIGINT; `on_ready()` is called once it listens.
    On the first signal the open requests are cancelled (their streams end cleanly) and uvicorn stops
    accepting and closes; a second SIGINT forces it. Returns normally either way (the signal is not
    re-raised: the command exits 0)."""
    import uvicorn

    api: Api = app.state.api

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

        def handle_exit(self, sig, frame) -> None:
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True
            api.begin_shutdown()

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=3)
    Server(config).run(sockets=[sock])
