"""`wsi-llava serve --model DIR --slides-root DIR`: the OpenAI-compatible slide chat API + web viewer."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..precision import add_precision_arguments
from .config import API_KEY_ENV, ServeConfig
from .security import is_loopback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig
    parser.add_argument("--model", required=True, help="trained WSI-LLaVA folder")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--slides-root", required=True,
                        help="folder of slide .h5 files clients may reference (nothing outside it is read)")
    parser.add_argument("--host", default=d.host, help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help="TCP port (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set); "
                             "prefer the environment variable, command lines are visible to other users")
    parser.add_argument("--model-name", default=None, help="model id clients send (default: the model folder's name)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="requests generated together (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=d.queue_size,
                        help="waiting requests before answering 429 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=d.request_timeout,
                        help="seconds per request, queue wait included (default: %(default)s)")
    parser.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                        help="largest max_tokens a request may ask for (default: %(default)s)")
    parser.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                        help="max_tokens when a request gives none (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest request body in bytes (default: %(default)s)")
    parser.add_argument("--slide-cache", type=int, default=d.slide_cache_items,
                        help="loaded slides kept in memory (default: %(default)s)")
    parser.add_argument("--slide-cache-mb", type=int, default=d.slide_cache_bytes // 2**20,
                        help="memory bound of the slide cache in MiB (default: %(default)s)")
    parser.add_argument("--visual-cache", type=int, default=d.visual_cache_items,
                        help="per-slide visual encodings kept (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for generation (default: torch's)")
    parser.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST…]",
                        help="Host header names to answer ('*' = any); default without an API key: localhost, "
                             "127.0.0.1, [::1] and --host (blocks DNS rebinding)")
    parser.add_argument("--slide-timeout", type=float, default=d.slide_timeout,
                        help="seconds one slide file read may take (default: %(default)s)")
    parser.add_argument("--slide-readers", type=int, default=d.slide_readers,
                        help="slide reads at a time (default: %(default)s)")
    parser.add_argument("--slide-reader", choices=["process", "thread"], default=d.slide_reader,
                        help="read slides in worker processes (killed at the timeout) or threads (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` of parsed arguments (the API key falls back to the environment)."""
    return ServeConfig(
        model=args.model, slides_root=args.slides_root, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, model_name=args.model_name,
        max_batch=args.max_batch, queue_size=args.queue_size, request_timeout=args.timeout,
        max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, slide_cache_items=args.slide_cache,
        slide_cache_bytes=args.slide_cache_mb * 2**20, visual_cache_items=args.visual_cache,
        device=args.device, precision=args.precision, force_precision=args.force_precision,
        torch_threads=args.threads, slide_timeout=args.slide_timeout, slide_readers=args.slide_readers,
        slide_reader=args.slide_reader,
        allowed_hosts=tuple(args.allowed_hosts.split(",")) if args.allowed_hosts is not None else None)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        app = create_app(config)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"wsi-llava serve: {e}", file=sys.stderr)
        return 2
    if not is_loopback(config.host) and not config.api_key:
        print(f"warning: serving on {config.host} without an API key: anyone who can reach this port can use "
              f"the model and read slide tiles; set {API_KEY_ENV} or --api-key", file=sys.stderr)
        if config.allowed_hosts is None:
            print(f"note: without an API key only requests with Host {', '.join(app.state.allowed_hosts)} are "
                  "answered; add the names clients use with --allowed-hosts", file=sys.stderr)
    print(f"serving {app.state.server.model_name!r} on http://{config.host}:{config.port}/ "
          f"(viewer at /, API at /v1; auth {'on' if config.api_key else 'off'})", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, server_header=False)
    return 0
