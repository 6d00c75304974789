"""Multipart form fields of the ``/upload/*`` routes parsed into what the JSON routes get.

``settings`` and ``spatial_refs`` arrive as JSON text in form fields; a bad one is a 422 like the
same mistake in a JSON body, naming the field.
"""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from moondream_server.api.moondream_wire import MAX_SPATIAL_REFS, SettingsIn
from moondream_server.api.spatial_refs import check_spatial_refs
from moondream_server.engine.types import SpatialRef


def parse_settings(raw: str | None) -> SettingsIn | None:
    if raw is None or not raw.strip():
        return None
    try:
        return SettingsIn.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", "settings", *e["loc"])} for e in exc.errors(include_input=False)]
        raise RequestValidationError(errors) from None


def parse_spatial_refs(raw: str | None) -> list[SpatialRef]:
    if raw is None or not raw.strip():
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(value, list) and len(value) > MAX_SPATIAL_REFS:  # before looking at every entry
        raise RequestValidationError(
            [
                {
                    "type": "too_long",
                    "loc": ("body", "spatial_refs"),
                    "msg": f"at most {MAX_SPATIAL_REFS} spatial_refs are accepted, got {len(value):,}",
                }
            ]
        )
    if not isinstance(value, list) or not all(
        isinstance(r, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in r)
        for r in value
    ):
        raise RequestValidationError(
            [
                {
                    "type": "list_type",
                    "loc": ("body", "spatial_refs"),
                    "msg": "must be a JSON list of number lists",
                }
            ]
        )
    return check_spatial_refs(value, has_image=True)
