"""Routes of the playground: its page at ``/`` and its assets under ``/static/``.

The page, its script, stylesheet and icon ship as package data in ``static/`` (no CDN, no build
step). Only those few names are served, so every other path keeps the API's own 404. They hold no
secret and need no API key (see ``auth.PUBLIC_PATHS``); the page sends the key its user types
with each ``/v1`` call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {
    "playground.js": "text/javascript",
    "playground.css": "text/css",
    "favicon.svg": "image/svg+xml",
}

# Everything the page loads comes from this origin; images are data:/blob: URLs made in the page.
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidate on every load, so that an upgraded server never runs with yesterday's script.
_NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={**_NO_CACHE, "Content-Security-Policy": _CSP})


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no playground asset named {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=_NO_CACHE)
