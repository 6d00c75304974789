"""Prometheus metrics through ``prometheus-client``, served on ``GET /metrics``.

Each app has its own registry (several apps may share a process: tests, Ray Serve replicas).

* HTTP, measured by :class:`MetricsMiddleware` around everything but path normalisation, so
  refusals (400 host, 401, 403, 408, 413, 503 while draining) count too:
  ``moondream_http_requests_total{route,method,status}`` and
  ``moondream_http_request_duration_seconds{route,method}`` (until the last byte of the answer;
  for a stream, its whole length). ``route`` is the route's path template, ``other`` for paths
  no route serves, so the label set stays bounded.
* Per finished generation, reported by the serving layer through :func:`observe_generation`
  (every surface runs its jobs there): ``moondream_time_to_first_token_seconds{task}``,
  ``moondream_queue_wait_seconds{task}``, ``moondream_request_input_tokens{task}`` and
  ``moondream_request_output_tokens{task}``.
* Read from the engine at each scrape: ``moondream_ready``, ``moondream_queue_depth``,
  ``moondream_active_sequences``, ``moondream_image_cache_bytes``, ``..._entries``,
  ``..._hits_total``, ``..._misses_total``, ``moondream_engine_requests_total{outcome}``,
  ``moondream_model_load_seconds`` (loading plus warm-up) and ``moondream_model_info``.

Autoscalers (a Kubernetes HPA through prometheus-adapter, KEDA) scale on ``moondream_queue_depth``.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moondream_server.engine.base import Engine
from moondream_server.engine.types import Metrics

router = APIRouter(tags=["health"])

# No ``*_created`` series beside every counter and histogram: they double the output and no
# dashboard here reads them (process-wide, but this process has no other registry).
disable_created_metrics()  # type: ignore[no-untyped-call]

_NS = "moondream"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Seconds: from a fast cached query to a long CPU caption.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 768, 1024, 2048, 4096, 8192)
# Engine outcome counters (Engine.stats keys) and what each means.
_OUTCOMES = ("completed", "failed", "interrupted", "expired_in_queue", "rejected_queue_full")


class AppMetrics:
    """The registry of one app and the instruments the API feeds."""

    def __init__(self, engine: Engine, engine_kind: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.load_seconds: float | None = None
        r = self.registry
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
            namespace=_NS,
            registry=r,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to the last byte of its answer (a stream's whole length).",
            ("route", "method"),
            namespace=_NS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time from a generation's submission to the engine to its first token (queue wait included).",
            ("task",),
            namespace=_NS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time a generation waited in the queue before the model took it.",
            ("task",),
            namespace=_NS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "request_input_tokens",
            "Text prompt tokens per finished generation.",
            ("task",),
            namespace=_NS,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "request_output_tokens",
            "Generated tokens per finished generation.",
            ("task",),
            namespace=_NS,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine, engine_kind, self))

    def observe(self, task: str, m: Metrics) -> None:
        self.input_tokens.labels(task).observe(m.input_tokens)
        self.output_tokens.labels(task).observe(m.output_tokens)
        if m.ttft_ms > 0:
            self.ttft.labels(task).observe(m.ttft_ms / 1000)
        self.queue_wait.labels(task).observe(m.queue_ms / 1000)


_current: contextvars.ContextVar[AppMetrics | None] = contextvars.ContextVar(
    "moondream_metrics", default=None
)


def observe_generation(task: str, metrics: Metrics) -> None:
    """Record a finished generation in the metrics of the app serving the current request."""
    sink = _current.get()
    if sink is not None:
        sink.observe(task, metrics)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, engine_kind: str, owner: AppMetrics) -> None:
        self.engine = engine
        self.engine_kind = engine_kind
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        yield GaugeMetricFamily(f"{_NS}_ready", "1 when the model is loaded and warmed up.", e.is_ready())
        yield GaugeMetricFamily(f"{_NS}_queue_depth", "Requests waiting for the model.", e.queue_depth)
        stats: Mapping[str, int] = e.stats
        yield GaugeMetricFamily(
            f"{_NS}_active_sequences", "Generations the model is running now.", stats.get("active", 0)
        )
        outcomes = CounterMetricFamily(
            f"{_NS}_engine_requests", "Generations ended, by outcome.", labels=("outcome",)
        )
        for outcome in _OUTCOMES:
            outcomes.add_metric((outcome,), stats.get(outcome, 0))
        yield outcomes
        if "image_cache_bytes" in stats:
            yield GaugeMetricFamily(
                f"{_NS}_image_cache_bytes",
                "Memory held by cached image encodings.",
                stats["image_cache_bytes"],
            )
            yield GaugeMetricFamily(
                f"{_NS}_image_cache_entries", "Images in the cache.", stats.get("image_cache_entries", 0)
            )
            yield CounterMetricFamily(
                f"{_NS}_image_cache_hits",
                "Requests whose image encoding came from the cache.",
                stats.get("image_cache_hits", 0),
            )
            yield CounterMetricFamily(
                f"{_NS}_image_cache_misses",
                "Requests whose image had to be encoded.",
                stats.get("image_cache_misses", 0),
            )
        if self.owner.load_seconds is not None:
            yield GaugeMetricFamily(
                f"{_NS}_model_load_seconds",
                "Time the engine took to load the model and warm it up.",
                self.owner.load_seconds,
            )
        info = e.info
        family = GaugeMetricFamily(
            f"{_NS}_model_info",
            "The model served (value 1); labels say which.",
            labels=("revision", "device", "dtype", "engine"),
        )
        family.add_metric((info.revision or "", info.device, info.dtype, self.engine_kind), 1)
        yield family


class MetricsMiddleware:
    """Counts and times every HTTP request by route template, and makes the app's metrics current
    for the request (see :func:`observe_generation`)."""

    def __init__(self, app: ASGIApp, metrics: AppMetrics, routes_of: Any) -> None:
        self.app = app
        self.metrics = metrics
        self._routes_of = routes_of  # the FastAPI app, whose routes are read at the first request
        self._templates: list[tuple[re.Pattern[str], str]] | None = None
        self._plain: frozenset[str] = frozenset()  # templates without parameters: a set lookup

    def _route(self, path: str) -> str:
        if self._templates is None:
            found = []
            for route in iter_route_contexts(self._routes_of.routes):
                regex = getattr(route, "path_regex", None)
                if isinstance(regex, re.Pattern) and route.path is not None:
                    found.append((regex, route.path))
            self._templates = found
            self._plain = frozenset(t for _, t in found if "{" not in t)
        if path in self._plain:
            return path
        for regex, template in self._templates:
            if regex.match(path):
                return template
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                method = scope["method"] if scope["method"] in _METHODS else "other"
                route = self._route(scope["path"])
                self.metrics.http_requests.labels(route, method, str(status)).inc()
                self.metrics.http_duration.labels(route, method).observe(time.perf_counter() - start)

        async def measured_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the last byte leaves: a client that saw the end sees it counted
            await send(message)

        token = _current.set(self.metrics)
        try:
            await self.app(scope, receive, measured_send)
        finally:
            _current.reset(token)
            record()


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    """Every series in the Prometheus text format (OpenMetrics when the scraper asks for it)."""
    app_metrics: AppMetrics = request.app.state.metrics
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(app_metrics.registry), media_type=content_type)
