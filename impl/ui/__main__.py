"""``python -m impl.ui --api URL``: serve the chat page until interrupted (see ``impl/ui/README.md``)."""

from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m impl.ui",
        description="A Gradio chat page streaming from an OpenAI-compatible API (python -m impl.serving api|up). "
                    "Analytics off, no share link, nothing fetched from the internet.")
    parser.add_argument("--api", required=True, metavar="URL",
                        help="base URL of the API, e.g. http://127.0.0.1:8000 (with or without /v1)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the page listens on (default 127.0.0.1; 0.0.0.0 inside a container)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default 7860; 0: any free port)")
    parser.add_argument("--api-key", default=os.environ.get("SERVING_API_KEY"),
                        help="bearer key the API expects (default: $SERVING_API_KEY; never printed)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="starting value of the max-tokens slider (default 256; the API clips it to the context)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="starting temperature (0 = greedy; default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="starting top-p (default 0.95)")
    args = parser.parse_args(argv)
    if not args.api.startswith(("http://", "https://")):
        parser.error(f"--api must be an http(s) URL such as http://127.0.0.1:8000, got {args.api!r}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.temperature <= 2:
        parser.error(f"--temperature must be between 0 and 2, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from impl.ui.app import Settings, build_ui, launch_ui  # gradio loads in seconds: after --help and checks

    ui = build_ui(args.api, args.api_key, Settings(args.max_tokens, args.temperature, args.top_p))
    url = launch_ui(ui, args.host, args.port)
    print(f"ui on {url} (API {args.api})", flush=True)
    try:
        ui.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        ui.close()


if __name__ == "__main__":
    main()
