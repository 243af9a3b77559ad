"""`wsi-llava serve --model DIR --slides-root DIR`: the OpenAI-compatible slide chat API + web viewer."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import WsiLlavaError
from ..infer.slide_features import add_raw_slide_arguments
from ..precision import add_precision_arguments
from .config import API_KEY_ENV, ServeConfig
from .security import is_loopback


#: flags that set one :class:`ServeConfig` field as given: (flag, field, type, help); the default is the field's
FIELD_FLAGS = (
    ("--host", "host", str, "address to bind (default: %(default)s, loopback only)"),
    ("--port", "port", int, "TCP port (default: %(default)s)"),
    ("--model-name", "model_name", str, "model id clients send (default: the model folder's name)"),
    ("--max-batch", "max_batch", int, "requests generated together (default: %(default)s)"),
    ("--queue-size", "queue_size", int, "waiting requests before answering 429 (default: %(default)s)"),
    ("--timeout", "request_timeout", float, "seconds per request, queue wait included (default: %(default)s)"),
    ("--max-tokens-limit", "max_tokens_limit", int, "largest max_tokens a request may ask for (default: %(default)s)"),
    ("--default-max-tokens", "default_max_tokens", int, "max_tokens when a request gives none (default: %(default)s)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body in bytes (default: %(default)s)"),
    ("--slide-cache", "slide_cache_items", int, "loaded slides kept in memory (default: %(default)s)"),
    ("--visual-cache", "visual_cache_items", int, "per-slide visual encodings kept (default: %(default)s)"),
    ("--threads", "torch_threads", int, "CPU threads for generation (default: torch's)"),
    ("--slide-timeout", "slide_timeout", float, "seconds one slide file read may take (default: %(default)s)"),
    ("--slide-readers", "slide_readers", int, "slide reads at a time (default: %(default)s)"),
    ("--tile-weights", "tile_weights", str, "tile encoder weights (.safetensors / .bin), local only: accept ROI "
                                            "images (image_url content parts), tiled and encoded when asked, and "
                                            "raw slides (.svs .tif .ndpi …), extracted on first use and cached"),
    ("--tile-encoder", "tile_encoder", str, "gigapath | uni | vit | timm:<arch> (default: the name in "
                                            "--tile-weights' metadata)"),
    ("--max-image-pixels", "max_image_pixels", int, "largest ROI image, width x height (default: %(default)s)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained WSI-LLaVA folder")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--slides-root", required=True,
                        help="folder of slide .h5 files (and raw slides, with --tile-weights) clients may reference "
                             "(nothing outside it is read)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set); "
                             "prefer the environment variable, command lines are visible to other users")
    for flag, name, kind, help_ in FIELD_FLAGS:
        parser.add_argument(flag, dest=name, type=kind, default=getattr(ServeConfig, name), help=help_,
                            metavar=flag[2:].upper().replace("-", "_"))
    parser.add_argument("--slide-cache-mb", type=int, default=ServeConfig.slide_cache_bytes // 2**20,
                        help="memory bound of the slide cache in MiB (default: %(default)s)")
    parser.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST…]",
                        help="Host header names to answer ('*' = any); default without an API key: localhost, "
                             "127.0.0.1, [::1] and --host (blocks DNS rebinding)")
    parser.add_argument("--slide-reader", choices=["process", "thread"], default=ServeConfig.slide_reader,
                        help="read slides in worker processes (killed at the timeout) or threads (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_raw_slide_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` of parsed arguments (the API key falls back to the environment)."""
    return ServeConfig(
        model=args.model, slides_root=args.slides_root, **{name: getattr(args, name) for _, name, _, _ in FIELD_FLAGS},
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, slide_cache_bytes=args.slide_cache_mb * 2**20,
        device=args.device, precision=args.precision, force_precision=args.force_precision,
        slide_reader=args.slide_reader, feature_cache=args.feature_cache, magnification=args.magnification,
        tile_size=args.tile_size, min_tissue=args.min_tissue, mpp_csv=args.mpp_csv,
        allowed_hosts=tuple(args.allowed_hosts.split(",")) if args.allowed_hosts is not None else None)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        app = create_app(config)
    except (ValueError, OSError, WsiLlavaError) as e:
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
