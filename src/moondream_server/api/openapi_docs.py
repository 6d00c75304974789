"""What the OpenAPI schema (/docs) says about error statuses, shared by every surface."""

from __future__ import annotations

from typing import Any

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: (
        "Bad input: invalid base64, not an image, a truncated image, invalid spatial_refs, or a "
        "question/object with more tokens than fit the model's context."
    ),
    401: "API keys are configured and the request carries none or a wrong one.",
    404: "The request names a model this server does not serve.",
    413: (
        "Over a server limit: the request body's size or its JSON structure (arrays and objects), "
        "or the image's pixel count or longest side."
    ),
    422: "A required field is missing, a field has the wrong type, or a field is over its schema limit.",
    429: (
        "The request queue is full, or the decoded images in flight are at their pixel budget; retry "
        "after the Retry-After seconds."
    ),
    500: "Unexpected server error.",
    501: "The skill is not available in the served model.",
    503: "The model is not loaded and warmed up yet; retry after the Retry-After seconds.",
    504: "The request did not finish within the server's deadline.",
}


def error_responses(*statuses: int, model: Any) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the surface's error body model."""
    return {s: {"model": model, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


# One event of a ``text/event-stream`` answer, as OpenAPI 3.2 describes stream items (and as
# schemathesis checks them): ``data`` carries the surface's JSON payload as text.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
