"""Server configuration: one pydantic-settings object.

Every field can be set by an environment variable with the prefix ``MOONDREAM_`` (e.g.
``MOONDREAM_PORT=9000``, ``MOONDREAM_API_KEYS=key1,key2``) and by the matching CLI flag of
``moondream-server`` (flags win over the environment).

The default bind host is ``127.0.0.1`` so that a server started by hand is not exposed to the
network by accident; the Docker image sets ``MOONDREAM_HOST=0.0.0.0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOONDREAM_", extra="ignore", validate_default=True)

    host: str = Field(default="127.0.0.1", description="Bind address (Docker sets 0.0.0.0).")
    port: int = Field(default=8001, ge=0, le=65535, description="TCP port (0 = any free port).")
    model: str = Field(
        default="vikhyatk/moondream2", description="Hugging Face repo id or a local checkpoint directory."
    )
    revision: str | None = Field(default="2025-06-21", description="Hub revision (ignored for local paths).")
    device: str = Field(default="auto", description='"auto", "cpu", "cuda", "cuda:N" or "mps".')
    dtype: str = Field(default="auto", description='"auto", "float32", "bfloat16" or "float16".')
    api_keys: str = Field(
        default="",
        description="Comma-separated API keys; any key set → every non-public route needs one.",
    )
    api_key: str = Field(
        default="",
        description="One API key (MOONDREAM_API_KEY, the variable the official client reads), taken whole.",
    )
    api_key_file: Path | None = Field(
        default=None, description="File with one API key per line (blank lines and # comments ignored)."
    )
    public_metrics: bool = Field(
        default=False, description="Serve /metrics without a key even when keys are configured."
    )
    allowed_hosts: str = Field(
        default="",
        description="Comma-separated Host header values to serve (*.example.com allowed); empty = any.",
    )
    cors_origins: str = Field(
        default="",
        description="Comma-separated browser origins allowed to call the API cross-origin ('*' = any); "
        "empty = none (cross-origin requests get 403).",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Time a connection has to send a request's headers."
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="Time a request has to send its whole body."
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="Idle time after which a keep-alive connection is closed."
    )
    shutdown_grace_s: float = Field(
        default=8.0,
        ge=0,
        description="On SIGTERM, time in-flight requests get to finish before streams are cut off.",
    )
    max_body_bytes: int = Field(default=20 * MiB, ge=1, description="Largest accepted request body.")
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, description="Largest accepted image (width × height)."
    )
    max_image_side: int = Field(
        default=16_384, ge=1, description="Longest accepted image side in pixels (read from the header)."
    )
    max_inflight_image_pixels: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Decoded pixels all requests may hold at once (queued or being served); an image that "
            "would go over is refused with 429. None = 4 × max_image_pixels."
        ),
    )
    image_decode_threads: int = Field(
        default=2, ge=1, description="Images decoded at once (threads of their own)."
    )
    max_queue: int = Field(
        default=64, ge=1, description="Requests allowed to wait for the model; more → 429."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Per-request deadline (queue + generation)."
    )
    engine: Literal["serial", "batched"] = Field(
        default="batched",
        description="Scheduling engine: continuous batching + image cache, or one at a time.",
    )
    max_batch_size: int = Field(default=8, ge=1, description="Largest batch of the batched engine.")
    image_cache_mb: int = Field(
        default=2048, ge=0, description="Image-embedding cache size (batched engine)."
    )
    kv_pool: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Batched engine: full-context KV caches for max_batch_size sequences in one pool, so "
            "their decode steps attend in one call (auto: on a GPU only)."
        ),
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Replay decode steps (and, in the batched engine, image prefills) from captured CUDA "
            "graphs (auto: on CUDA devices; on elsewhere runs the same static steps without graphs)."
        ),
    )
    cpu_weights: Literal["auto", "float32", "float16"] = Field(
        default="auto",
        description="float32 on CPU: hold linear weights as float16 where lossless (auto), never, or always.",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="CPU: hold linear weights as int8 with per-channel scales (smaller, faster decoding, "
        "small drift), or as the checkpoint's precision (none).",
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (None = torch default)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def allowed_host_list(self) -> list[str]:
        return [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]

    def cors_origin_set(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    def resolved_api_keys(self) -> frozenset[str]:
        """All configured keys: ``api_keys``, ``api_key`` and the lines of ``api_key_file``.

        Auth fails closed: a source that is set but yields no key (``--api-key ","``, a key file
        holding only comments) raises :class:`KeySourceError` instead of starting an open server.
        An empty variable counts as unset (compose files pass ``MOONDREAM_API_KEYS=`` through).
        """
        keys: set[str] = set()
        if self.api_keys.strip():
            listed = {k.strip() for k in self.api_keys.split(",")} - {""}
            if not listed:
                raise KeySourceError(
                    f"--api-key / MOONDREAM_API_KEYS is set ({self.api_keys!r}) but holds no key; "
                    "refusing to start without authentication. Give a key, or unset it to run without keys."
                )
            keys |= listed
        if self.api_key.strip():
            keys.add(self.api_key.strip())
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise KeySourceError(
                    f"cannot read the API key file {self.api_key_file}: {exc.strerror}"
                ) from exc
            from_file = {line.strip() for line in text.splitlines()}
            from_file = {line for line in from_file if line and not line.startswith("#")}
            if not from_file:
                raise KeySourceError(
                    f"the API key file {self.api_key_file} holds no key (only blank lines or # comments); "
                    "refusing to start without authentication."
                )
            keys |= from_file
        return frozenset(keys)


class KeySourceError(ValueError):
    """A configured API key source that cannot be read or yields no key: a start-up error."""
