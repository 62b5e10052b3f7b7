"""Serve a model over HTTP with OpenAI's API: many clients at once, batched, with prompt prefixes reused.

Routes: GET /v1/models, POST /v1/chat/completions (the checkpoint's chat template, as `chat` uses it),
POST /v1/completions (the prompt as `generate` encodes it), GET /health (load: running and waiting requests).
Streaming (server-sent events), stop strings, seed, logprobs, usage with cached prompt tokens. Needs the serve
extra: pip install 'llama_min[serve]'. SIGTERM or Ctrl-C ends the open streams and exits 0.

Examples:
  llama-min serve                                        # the default model on http://127.0.0.1:8000/v1
  llama-min serve -m Llama-3.2-1B-Instruct-Q4_K_M.gguf --port 8080 --api-key secret --max-batch 16
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}'
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from ..errors import EnvironmentFailure
from .common import Parser, check_number, check_utf8, run_main, say
from .loading import add_model_flags, check_flags, load_llama

API_KEY_ENV = "LLAMA_MIN_API_KEY"


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 (default: "
                   f"${API_KEY_ENV} when set, else no key)")
    p.add_argument("--model-name", default=None, help="the model id /v1/models lists (default: the checkpoint's "
                   "file or folder name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row at most; more are "
                   "answered 429 with Retry-After (default 64)")
    p.add_argument("--cache-mb", type=float, default=None, help="memory for the prefix cache, in MiB: keys and "
                   "values of earlier prompts, reused when a prompt starts the same way (default: the engine's)")
    add_model_flags(p)
    # check_flags reads the sampling flags generate has; here each request brings its own
    p.set_defaults(max_new_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
                   repetition_penalty=None)
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    """The flags, checked before anything loads (UsageError naming the flag)."""
    args = build_parser(prog).parse_args(argv)
    check_number("--port", args.port, low=0, high=65535, integer=True)
    check_number("--max-batch", args.max_batch, low=1, integer=True)
    check_number("--max-queue", args.max_queue, low=0, integer=True)
    check_number("--cache-mb", args.cache_mb, low=0)
    for flag in ("host", "api_key", "model_name"):
        check_utf8("--" + flag.replace("_", "-"), getattr(args, flag))
    check_flags(args)
    args.api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return args


def require_serve_extra() -> None:
    """Starlette and uvicorn are installed (found, not imported), or one line saying what to install."""
    missing = [name for name in ("starlette", "uvicorn") if find_spec(name) is None]
    if missing:
        raise EnvironmentFailure(f"llama-min serve needs {' and '.join(missing)}: pip install 'llama_min[serve]'")


def model_id(args, path) -> str:
    """--model-name, else the checkpoint's file name without .gguf (or its folder's name)."""
    if args.model_name:
        return args.model_name
    name = Path(path).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def serve(args) -> int:
    """Load the model, start the engine, serve until SIGTERM/SIGINT; exit 0."""
    from ..serve.app import Api, create_app, listening_socket, run_server
    from ..serve.engine import Engine

    sock = listening_socket(args.host, args.port)  # a busy port is said before the model loads
    llama, load_s = load_llama(args)
    cache_bytes = None if args.cache_mb is None else int(args.cache_mb * 2**20)
    engine = Engine(llama, max_batch=args.max_batch, cache_bytes=cache_bytes, max_queue=args.max_queue)
    name = model_id(args, checkpoint_path(args))
    api = Api(engine, llama.tokenizer, name, llama.max_seq_len, args.api_key)
    host, port = sock.getsockname()[:2]

    def ready():
        if not args.quiet:
            say(f"serving {name} on http://{host if ':' not in host else f'[{host}]'}:{port}/v1 (window "
                f"{llama.max_seq_len} tokens, batch {args.max_batch}, loaded in {load_s:.1f} s"
                f"{', API key required' if args.api_key else ''}); Ctrl-C stops")

    engine.start()
    try:
        run_server(create_app(api), sock, on_ready=ready)
    finally:
        engine.stop(timeout=5)
    if not args.quiet:
        say("stopped")
    return 0


def checkpoint_path(args) -> str:
    """-m, or the default model's path (already fetched by then)."""
    if args.ckpt:
        return args.ckpt
    from ..assets import default_model_path

    return str(default_model_path())


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = parse_args(argv, prog)
        require_serve_extra()
        return serve(args)

    return run_main(body, argv)
