"""``GET /metrics``: the engine's gauges and counters in the Prometheus text format.

Autoscalers (a Kubernetes HPA through a Prometheus adapter, KEDA) scale on the queue depth
here rather than on CPU, which says little about a server whose work waits in a queue.
Open like /health: it reveals counts, never request content.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from moondream_server.engine.base import Engine

router = APIRouter(tags=["health"])

_PREFIX = "moondream_"


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(request: Request) -> PlainTextResponse:
    """Readiness, queue depth and request counters (Prometheus text exposition format 0.0.4)."""
    engine: Engine = request.app.state.engine
    lines: list[str] = []

    def gauge(name: str, value: float, help_text: str) -> None:
        lines.extend(
            [
                f"# HELP {_PREFIX}{name} {help_text}",
                f"# TYPE {_PREFIX}{name} gauge",
                f"{_PREFIX}{name} {value:g}",
            ]
        )

    gauge("ready", 1 if engine.is_ready() else 0, "1 when the model is loaded and warmed up.")
    gauge("queue_depth", engine.queue_depth, "Requests waiting for the model.")
    for key, value in sorted(engine.stats.items()):
        # Counters and gauges share one family per key; the engine's names say which.
        gauge(f"engine_{key}", value, f"Engine figure '{key}' (see /health 'requests').")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
