"""The FastAPI application: the surfaces' routes, error handlers, middleware, and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.middleware.trustedhost import TrustedHostMiddleware

import moondream_server
from moondream_server.api import health, metrics
from moondream_server.api.auth import AuthMiddleware
from moondream_server.api.cross_origin import CORSMiddleware, CrossOriginGuard, cors_middleware_options
from moondream_server.api.decoder import ImageDecoder
from moondream_server.api.disconnect import CancelOnDisconnectMiddleware
from moondream_server.api.docs_pages import DOCS_ASSETS, DocsPolicyMiddleware
from moondream_server.api.errors import install_exception_handlers, register_error_shape
from moondream_server.api.images import configure_pillow
from moondream_server.api.json_body import check_routes
from moondream_server.api.metrics import AppMetrics, MetricsMiddleware
from moondream_server.api.middleware import BodyLimitMiddleware, PathNormalizeMiddleware
from moondream_server.api.shutdown import Drain, DrainMiddleware
from moondream_server.api.surface import discover_surfaces
from moondream_server.engine.base import Engine
from moondream_server.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Self-hosted Moondream2, wire-compatible with Moondream Cloud.

* **/v1/...** — the cloud API: point the official client at it with
  `moondream.vl(endpoint="http://HOST:PORT/v1", api_key=...)`.
* **/caption, /query, /detect, /point, /upload/...** — the original JSON and multipart routes.

Coordinates are normalised to 0..1 with the origin at the top-left corner of the uploaded
pixel grid (after EXIF orientation is applied). When the server has API keys, send one in the
`X-Moondream-Auth` header or as `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    if engine is None:
        from moondream_server.engine.loader import create_engine

        engine = create_engine(settings)
    configure_pillow(settings.max_image_pixels)
    app_metrics = AppMetrics(engine, settings.engine)
    decoder = ImageDecoder(
        max_pixels=settings.max_image_pixels,
        max_side=settings.max_image_side,
        workers=settings.image_decode_threads,
        inflight_pixels=settings.max_inflight_image_pixels,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /health answers at once, /health/ready turns 200 when loaded.
        task = asyncio.create_task(_timed_start(engine, app_metrics), name="engine-start")
        task.add_done_callback(_log_start_result)
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await engine.stop()
            decoder.close()

    # fastapi-offline: /docs and /redoc load Swagger UI and ReDoc from files it ships, served under
    # DOCS_ASSETS, instead of from a CDN (a blank page offline), and ReDoc without Google Fonts.
    # See docs_pages.py.
    app = FastAPIOffline(
        title="moondream-server",
        version=moondream_server.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redirect_slashes=False,
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.image_decoder = decoder
    app.state.api_keys = keys = settings.resolved_api_keys()
    app.state.drain = Drain()
    app.state.metrics = app_metrics
    if keys:
        where = "open" if settings.public_metrics else "behind the keys"
        named = (
            ("--api-key/MOONDREAM_API_KEYS", settings.api_keys.strip()),
            ("MOONDREAM_API_KEY", settings.api_key.strip()),
            ("--api-key-file", settings.api_key_file),
        )
        sources = ", ".join(name for name, value in named if value)
        log.info("authentication on: %d key(s) from %s; /metrics is %s", len(keys), sources, where)
    else:
        log.warning("no API keys configured: every route is open to anyone who can reach this server")
    install_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for surface in discover_surfaces():
        app.include_router(surface.router)
        body = surface.error_body
        if body is not None:
            for prefix in surface.error_prefixes:
                register_error_shape(prefix, body)
    check_routes(app)
    # Innermost: cancels a route's work when its client leaves before the response starts.
    app.add_middleware(CancelOnDisconnectMiddleware)
    # Added last = outermost. Paths are normalised before anything looks at them; the Host and
    # Origin checks and the key come before a byte of the body is read; CORS sits outside the
    # key check so that preflights (which carry no key) and 401s get their CORS headers.
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    app.add_middleware(AuthMiddleware, keys=keys, public_metrics=settings.public_metrics)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(DocsPolicyMiddleware)
    origins = settings.cors_origin_set()
    if origins:
        app.add_middleware(CORSMiddleware, **cors_middleware_options(origins))  # type: ignore[arg-type]
    app.add_middleware(CrossOriginGuard, allowed_origins=origins)
    if settings.allowed_host_list():
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_host_list())
    app.add_middleware(MetricsMiddleware, metrics=app_metrics, routes_of=app)
    app.add_middleware(PathNormalizeMiddleware)
    return app


async def _timed_start(engine: Engine, app_metrics: AppMetrics) -> None:
    start = time.perf_counter()
    await engine.start()
    app_metrics.load_seconds = time.perf_counter() - start


def _log_start_result(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("the engine failed to start: %s", exc)
    else:
        log.info("the model is loaded and warm; ready to serve")
