"""``scriptorium serve``: the model behind OpenAI's API and a chat page, on loopback by default.

Kept out of ``pipeline/cli.py`` (which only registers it) and light to import: torch, Starlette
and uvicorn load when the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

__all__ = ["add_serve"]


def _cmd_serve(args: argparse.Namespace) -> int:
    """Load the weights, start the batching engine and serve until SIGINT/SIGTERM."""
    import torch
    import uvicorn

    from llm_core.batching import BatchEngine
    from llm_core.checkpoint import load_weights
    from llm_core.tokenizer import load_tokenizer
    from pipeline.cli import _resolve_tokenizer
    from pipeline.serve.app import ServeSettings, build_app

    weights = Path(args.weights)
    try:
        tokenizer = load_tokenizer(_resolve_tokenizer(weights, args.tokenizer))
        model = load_weights(weights).eval()
    except (FileNotFoundError, ValueError) as exc:
        print(f"scriptorium serve: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = model.config.context_length
    settings = ServeSettings(
        model_id=args.model_name or weights.resolve().name,
        max_tokens_cap=min(args.max_tokens_cap or ctx, ctx),
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes,
    )
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # from here a client waits in the backlog until uvicorn accepts
    except OSError as exc:
        print(
            f"scriptorium serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 1
    engine = BatchEngine(model, max_batch=args.max_batch, max_queue=args.max_queue).start()
    app = build_app(engine, tokenizer, settings)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {settings.model_id} at http://{shown}:{port}/", flush=True)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print("warning: listening beyond loopback; the API has no authentication", file=sys.stderr)
    try:
        server.run(sockets=[sock])  # uvicorn handles SIGINT/SIGTERM: a graceful shutdown
    finally:
        engine.stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    print("server stopped", flush=True)
    return 0


def add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model: OpenAI-compatible API (/v1/...) and a chat page at /"
    )
    serve.add_argument("--weights", required=True, help="folder with model.safetensors, config")
    serve.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside weights)")
    serve.add_argument("--host", default="127.0.0.1", help="default loopback only")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--model-name", default=None, help="the id clients name (default: folder)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond those")
    serve.add_argument(
        "--max-tokens-cap", type=int, default=None, help="most tokens a request may ask for"
    )
    serve.add_argument("--default-max-tokens", type=int, default=200)
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level")
    serve.set_defaults(func=_cmd_serve)
