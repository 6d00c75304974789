"""``moondream-server``: parse flags over the MOONDREAM_* environment and run uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from moondream_server.settings import KeySourceError, Settings

_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"help": "Hub repo id or local checkpoint folder (default vikhyatk/moondream2)"}),
    ("--revision", "revision", {"help": "Hub revision (default 2025-06-21)"}),
    ("--host", "host", {"help": "bind address (default 127.0.0.1; Docker uses 0.0.0.0)"}),
    ("--port", "port", {"type": int, "help": "port (default 8001)"}),
    ("--device", "device", {"help": "auto | cpu | cuda | cuda:N | mps"}),
    ("--dtype", "dtype", {"help": "auto | float32 | bfloat16 | float16"}),
    ("--api-key", "api_keys", {"help": "API key(s), comma-separated; enables auth"}),
    ("--api-key-file", "api_key_file", {"help": "file with one API key per line; enables auth"}),
    (
        "--public-metrics",
        "public_metrics",
        {"action": "store_true", "help": "serve /metrics without a key even when keys are set"},
    ),
    (
        "--allowed-hosts",
        "allowed_hosts",
        {"help": "Host header values to serve, comma-separated (default any)"},
    ),
    ("--cors-origins", "cors_origins", {"help": "browser origins allowed cross-origin (default none)"}),
    (
        "--header-timeout",
        "header_timeout_s",
        {"type": float, "help": "s to send request headers (default 10)"},
    ),
    ("--body-timeout", "body_timeout_s", {"type": float, "help": "s to send a request body (default 60)"}),
    (
        "--keep-alive-timeout",
        "keep_alive_timeout_s",
        {"type": float, "help": "s an idle keep-alive connection stays open (default 5)"},
    ),
    (
        "--shutdown-grace",
        "shutdown_grace_s",
        {"type": float, "help": "s in-flight requests get after SIGTERM (default 8)"},
    ),
    ("--max-body-bytes", "max_body_bytes", {"type": int, "help": "largest request body (default 20 MiB)"}),
    ("--max-image-pixels", "max_image_pixels", {"type": int, "help": "largest image, width×height"}),
    ("--max-image-side", "max_image_side", {"type": int, "help": "longest image side (default 16384)"}),
    (
        "--max-inflight-image-pixels",
        "max_inflight_image_pixels",
        {"type": int, "help": "decoded pixels all requests may hold at once (default 4 × max image pixels)"},
    ),
    ("--image-decode-threads", "image_decode_threads", {"type": int, "help": "images decoded at once (2)"}),
    ("--max-queue", "max_queue", {"type": int, "help": "waiting requests before 429 (default 64)"}),
    (
        "--request-timeout",
        "request_timeout_s",
        {"type": float, "help": "per-request deadline, s (default 300)"},
    ),
    ("--engine", "engine", {"choices": ["serial", "batched"], "help": "scheduling engine (default batched)"}),
    ("--max-batch-size", "max_batch_size", {"type": int, "help": "batched engine: largest batch"}),
    ("--image-cache-mb", "image_cache_mb", {"type": int, "help": "batched engine: image cache size"}),
    (
        "--kv-pool",
        "kv_pool",
        {"choices": ["auto", "on", "off"], "help": "batched engine: pooled KV caches (default: GPU only)"},
    ),
    (
        "--cuda-graphs",
        "cuda_graphs",
        {"choices": ["auto", "on", "off"], "help": "decode steps as CUDA graphs (auto: on CUDA)"},
    ),
    (
        "--cpu-weights",
        "cpu_weights",
        {
            "choices": ["auto", "float32", "float16"],
            "help": "float32 on CPU: float16 weight storage (default auto)",
        },
    ),
    (
        "--quantize",
        "quantize",
        {"choices": ["none", "int8"], "help": "CPU: int8 weights with per-channel scales (default none)"},
    ),
    ("--threads", "threads", {"type": int, "help": "torch CPU threads (default: torch's choice)"}),
    ("--log-level", "log_level", {"help": "critical | error | warning | info | debug"}),
]


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="moondream-server",
        description="Serve Moondream2 over HTTP (Moondream Cloud compatible). "
        "Every flag can also be set as MOONDREAM_<NAME> in the environment; flags win.",
    )
    for flag, dest, kwargs in _FLAGS:
        parser.add_argument(flag, dest=dest, default=None, **kwargs)
    args = parser.parse_args(argv)
    if args.api_keys is not None and not args.api_keys.strip():
        raise KeySourceError("--api-key was given an empty value; refusing to start without authentication")
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = parse_settings(argv)
        settings.resolved_api_keys()  # an unreadable key file is a startup error, not a 500 later
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"moondream-server: invalid settings: {problems}") from None
    except ValueError as exc:
        raise SystemExit(f"moondream-server: {exc}") from None
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from moondream_server.api.app import create_app
    from moondream_server.api.server import server

    server(create_app(settings), settings).run()


if __name__ == "__main__":
    main()
