"""Scale out with Ray Serve: the same FastAPI app, one model + engine per replica.

Run it (needs the optional extra: ``pip install "moondream-server[ray]"``)::

    serve run moondream_server.deploy.ray_serve:app_builder \\
        model=vikhyatk/moondream2 num_replicas=2 num_gpus=1

Every ``key=value`` is a builder argument (strings, as ``serve run`` passes them):

* any server setting (the fields of :class:`moondream_server.settings.Settings`: ``model``,
  ``revision``, ``device``, ``dtype``, ``engine``, ``max_batch_size``, ``max_queue``, ``api_keys``,
  ``threads``, ...). Unset ones come from the ``MOONDREAM_*`` environment of the ``serve run``
  process, then the defaults; they are resolved once there and shipped to every replica, so all
  replicas serve the same configuration.
* ``num_replicas`` (default 1), or ``min_replicas`` / ``max_replicas`` for autoscaling on ongoing
  requests (``target_ongoing_requests`` per replica, default: what one replica runs at once);
* ``num_gpus`` per replica (default 1 when the device is not ``cpu``; fractions such as 0.5 pack two
  replicas on one GPU) and ``num_cpus`` (default 1);
* ``max_ongoing_requests`` (default 2 × what one replica runs at once: 1 for the serial engine,
  ``max_batch_size`` for the batched one) and ``max_queued_requests`` (default ``max_queue``).
  Requests above ``max_ongoing_requests`` wait in Ray's router, where they are spread over the
  replicas; above ``max_queued_requests`` Ray answers 503.

Each response carries ``X-Moondream-Replica`` (Ray's replica id) so load spreading can be seen.
A replica reports ready to Ray only once its model is loaded and warm, so Ray never routes a request
to a replica that would answer 503; a replica whose model fails to load fails its start and Ray
retries it. Ray's HTTP proxy listens on 127.0.0.1:8000 unless ``serve start --http-host 0.0.0.0
--http-port 8001`` (or a Serve config file) says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moondream_server.engine.base import Engine
from moondream_server.settings import Settings

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Moondream-Replica"
DEPLOYMENT_NAME = "MoondreamServer"


class ScaleOptions(BaseModel):
    """The Ray-side knobs of :func:`app_builder` (everything else is a server setting)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1)
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)
    ready_timeout_s: float = Field(1800.0, gt=0, description="Longest a replica may take to load.")


def concurrency(settings: Settings) -> int:
    """Requests one replica works on at the same time."""
    return settings.max_batch_size if settings.engine == "batched" else 1


def deployment_options(settings: Settings, scale: ScaleOptions) -> dict[str, Any]:
    """``serve.deployment`` options for ``settings`` and ``scale`` (plain data, testable without Ray)."""
    per_replica = concurrency(settings)
    num_gpus = scale.num_gpus
    if num_gpus is None:
        num_gpus = 0.0 if settings.device == "cpu" else 1.0
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": scale.max_ongoing_requests or 2 * per_replica,
        "max_queued_requests": (
            scale.max_queued_requests if scale.max_queued_requests is not None else settings.max_queue
        ),
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": num_gpus},
        "graceful_shutdown_timeout_s": 30.0,
        "health_check_period_s": 10.0,
    }
    if scale.min_replicas is not None or scale.max_replicas is not None:
        if scale.num_replicas is not None:
            raise ValueError("give num_replicas, or min_replicas/max_replicas for autoscaling, not both")
        low = scale.min_replicas if scale.min_replicas is not None else 1
        high = scale.max_replicas if scale.max_replicas is not None else max(low, 1)
        if high < low:
            raise ValueError(f"max_replicas ({high}) < min_replicas ({low})")
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": scale.target_ongoing_requests or float(per_replica),
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 300.0,
        }
    else:
        options["num_replicas"] = scale.num_replicas or 1
    return options


def replica_settings(settings: Settings, options: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a replica runs with: the engine's own queue never refuses what Ray admits."""
    data = settings.model_dump(mode="json")
    data["max_queue"] = max(settings.max_queue, int(options["max_ongoing_requests"]))
    return data


class ReplicaHeaderMiddleware:
    """Pure ASGI middleware: add ``X-Moondream-Replica: <id>`` to every HTTP response."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode("latin-1"), replica_id.encode("latin-1"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


async def wait_until_ready(engine: Engine, timeout_s: float) -> None:
    """Return once ``engine.is_ready()``; raise if it failed to load or took too long."""
    deadline = time.monotonic() + timeout_s
    while not engine.is_ready():
        error = engine.load_error
        if error is not None:
            raise RuntimeError(f"the model failed to load: {error}") from error
        if time.monotonic() > deadline:
            raise TimeoutError(f"the model was not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


def build_replica_app(settings_data: Mapping[str, Any], replica_id: str, ready_timeout_s: float) -> Any:
    """The server's FastAPI app for one replica, tagged with ``replica_id``, ready only when loaded."""
    from moondream_server.api.app import create_app

    app = create_app(Settings(**settings_data))
    engine = app.state.engine
    serve_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
        async with serve_lifespan(asgi_app) as state:
            await wait_until_ready(engine, ready_timeout_s)
            yield state

    app.router.lifespan_context = lifespan
    app.state.replica_id = replica_id
    app.add_middleware(ReplicaHeaderMiddleware, replica_id=replica_id)
    return app


def _replica_id() -> str:
    from ray import serve

    context: Any = serve.get_replica_context()
    replica_id = getattr(context, "replica_id", None)
    unique = getattr(replica_id, "unique_id", None)
    return str(unique if unique is not None else context.replica_tag)


def _make_deployment(options: Mapping[str, Any]) -> Any:
    from ray import serve

    @serve.ingress()
    class MoondreamServer:
        """One replica: the FastAPI app with its own model and engine."""

        def __init__(self, settings_data: dict[str, Any], ready_timeout_s: float) -> None:
            self._settings_data = settings_data
            self._ready_timeout_s = ready_timeout_s

        def __serve_build_asgi_app__(self) -> Any:
            self._app = build_replica_app(self._settings_data, _replica_id(), self._ready_timeout_s)
            return self._app

        def check_health(self) -> None:
            """Ray's periodic replica check: a replica whose engine stopped serving is replaced."""
            app = getattr(self, "_app", None)
            if app is not None and not app.state.engine.is_ready():
                raise RuntimeError("the engine is not ready")

    return serve.deployment(**options)(MoondreamServer)


def split_args(args: Mapping[str, Any]) -> tuple[Settings, ScaleOptions]:
    """Sort builder arguments into server settings and Ray options; unknown keys are an error."""
    scale_keys = set(ScaleOptions.model_fields)
    unknown = set(args) - scale_keys - set(Settings.model_fields)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {sorted(unknown)}; use server settings "
            f"({', '.join(sorted(Settings.model_fields))}) or {', '.join(sorted(scale_keys))}"
        )
    try:
        scale = ScaleOptions(**{k: v for k, v in args.items() if k in scale_keys})
        settings = Settings(**{k: v for k, v in args.items() if k not in scale_keys})
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc
    return settings, scale


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: ``serve run moondream_server.deploy.ray_serve:app_builder k=v``."""
    settings, scale = split_args(args)
    options = deployment_options(settings, scale)
    log.info("moondream on Ray Serve: %s", options)
    deployment = _make_deployment(options)
    return deployment.bind(replica_settings(settings, options), scale.ready_timeout_s)
