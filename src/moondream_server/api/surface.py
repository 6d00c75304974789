"""An API surface (a family of routes speaking one client's format) and how the app finds them.

A surface is a subpackage of ``moondream_server.api`` whose ``__init__`` defines ``SURFACE``: its
router (routes in ``router.py``, request/response schemas in ``protocol.py``) and, when its
errors have their own shape, that shape and the path prefixes it applies under. The routes run skills through
``serving``; the app includes every surface it finds, so adding one is adding its package.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from fastapi import APIRouter

from moondream_server.api.errors import ErrorBody


@dataclass(frozen=True)
class Surface:
    name: str
    router: APIRouter
    error_body: ErrorBody | None = None
    error_prefixes: tuple[str, ...] = ()  # errors on paths under these are rendered with error_body


def discover_surfaces() -> list[Surface]:
    """Every ``SURFACE`` among the subpackages of ``moondream_server.api``, by name."""
    package = importlib.import_module("moondream_server.api")
    found = []
    for module in pkgutil.iter_modules(package.__path__):
        if not module.ispkg:
            continue
        surface = getattr(importlib.import_module(f"{package.__name__}.{module.name}"), "SURFACE", None)
        if isinstance(surface, Surface):
            found.append(surface)
    return sorted(found, key=lambda s: s.name)
