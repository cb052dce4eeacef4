"""``python -m impl.serving api|router|up``: one model worker, the load balancer, or everything at once.

    python -m impl.serving api --model chat --port 8000 [--api-key KEY] [--max-queue 64] [--prefix-caching]
    python -m impl.serving router --port 8000 --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002
    python -m impl.serving up            # router + 2 workers + the Gradio UI

``api`` prints ``serving on http://HOST:PORT`` on stdout once it listens (``--port 0``: a free port, the
actual one printed), so scripts and the router's supervisor can find it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def default_model() -> str:
    """``chat`` when the model cache holds a current build of it, else ``bpe-base``: the character model's
    tokenizer refuses most text. Decided without building anything."""
    try:
        from impl import model_cache, zoo  # noqa: F401  (importing the zoo registers "chat" and its key)

        return "chat" if model_cache.state("chat") == "cached" else "bpe-base"
    except Exception:  # an unreadable cache: fall back rather than fail to start
        return "bpe-base"


def api_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None,
                        help="zoo name (chat, bpe-base, ...) or a saved model directory; default: chat if it is "
                             "built, else bpe-base")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port; default 8000)")
    parser.add_argument("--api-key", default=os.environ.get("SERVING_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $SERVING_API_KEY, else open)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests allowed to wait for the engine; beyond it: 429 (default: unbounded)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="rows in the engine's running batch")
    parser.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per engine step")
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV-cache blocks (default: every row at the full context)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take before it is aborted (504); default 600")
    parser.add_argument("--prefix-caching", action="store_true", help="reuse cached KV blocks of shared prefixes")
    parser.add_argument("--draft", default=None, help="draft model for speculative decoding (zoo name or dir)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def serve_api(args: argparse.Namespace) -> None:
    """Start uvicorn on ``args`` and block until interrupted."""
    import torch
    import uvicorn

    from impl.serving.app import ServerConfig, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(model=args.model or default_model(), api_key=args.api_key,
                              max_queue=args.max_queue, max_num_seqs=args.max_num_seqs,
                              max_batched_tokens=args.max_batched_tokens, block_size=args.block_size,
                              num_blocks=args.num_blocks, prefix_caching=args.prefix_caching, draft=args.draft,
                              request_timeout_s=args.request_timeout, device=args.device)
    except ValueError as e:
        sys.exit(f"python -m impl.serving api: {e}")
    logging.getLogger("impl.serving").info(
        "serving model %s on %s (max_num_seqs %d, max_queue %s, prefix caching %s, draft %s, timeout %s s, API key %s)",
        config.model, config.device, config.max_num_seqs, config.max_queue, config.prefix_caching, config.draft,
        config.request_timeout_s, "required" if config.api_key else "off")
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=args.host, port=args.port,
                                           log_level=args.log_level, access_log=False))
    asyncio.run(_serve_and_announce(server))


async def _serve_and_announce(server) -> None:
    """Run uvicorn; once it listens, print the URL it actually bound (port 0 picks one)."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        print(f"serving on http://{host}:{port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m impl.serving",
                                     description="Serve our engine over an OpenAI-compatible HTTP API.")
    sub = parser.add_subparsers(dest="command", required=True)
    api_parser(sub.add_parser("api", help="one model worker (FastAPI on uvicorn)",
                              description="Serve one model: /v1/completions, /v1/chat/completions, /v1/models, "
                                          "/health, /ready, /metrics."))
    sub.add_parser("router", help="least-outstanding-requests load balancer over workers", add_help=False)
    sub.add_parser("up", help="router + workers + the Gradio UI in one command", add_help=False)
    if argv and argv[0] in ("router", "up"):  # their own parsers own their flags
        import importlib

        return importlib.import_module(f"impl.serving.{argv[0]}").main(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        serve_api(args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
