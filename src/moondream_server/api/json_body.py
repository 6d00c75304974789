"""How JSON request bodies are parsed: a bound on their structure, then a fast parser.

FastAPI parses a JSON body with ``json.loads`` on the event loop, so the body's shape decides how
long every other request waits: 19 MB of ``[{},{},...]`` took ~2 s to parse (and ~0.5 GB), and a
million ``spatial_refs`` ~19 s to parse and validate, with ``/health`` stalled throughout. (A
worker thread would not help: the parser holds the GIL for the whole parse.) So every JSON body:

* may hold at most :data:`MAX_JSON_CONTAINERS` arrays and objects, counted as ``[`` and ``{``
  bytes (inside strings too: no legitimate request comes near the limit; its largest, 64
  ``spatial_refs``, needs ~70) — over it, 413 before anything is parsed. The count is a C scan,
  a few ms for the largest body;
* is parsed by pydantic-core's parser (the one pydantic validates with), ~10× faster than
  ``json.loads`` on a body that is mostly one long base64 string. Input it rejects goes through
  ``json.loads`` again, so malformed JSON keeps FastAPI's 422 with the error position.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

MAX_JSON_CONTAINERS = 4096


class BoundedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = parse_json_body(body)
        return self._json


def parse_json_body(body: bytes) -> Any:
    containers = body.count(b"[") + body.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise HTTPException(
            413,
            f"the JSON body holds {containers:,} arrays and objects; the limit is {MAX_JSON_CONTAINERS:,}",
        )
    try:
        return pydantic_core.from_json(body)
    except ValueError:
        return json.loads(body)  # raises json.JSONDecodeError: FastAPI's 422 with the position


class BoundedJSONRoute(APIRoute):
    """An API route whose JSON body is parsed by :class:`BoundedJSONRequest`.

    Every router with body-taking routes is built with ``APIRouter(route_class=BoundedJSONRoute)``;
    the app refuses to start otherwise (:func:`check_routes`).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(BoundedJSONRequest(request.scope, request.receive))

        return handle


def check_routes(app: FastAPI) -> None:
    """Raise at start-up if a route that takes a body would parse it unbounded."""
    loose = [
        f"{sorted(r.methods or ())} {r.path}"
        for r in app.routes
        if isinstance(r, APIRoute) and r.body_field is not None and not isinstance(r, BoundedJSONRoute)
    ]
    if loose:
        raise RuntimeError(
            "routes taking a body must be built with APIRouter(route_class=BoundedJSONRoute) "
            f"(moondream_server.api.json_body): {', '.join(loose)}"
        )
