"""What the OpenAPI schema (/docs) says about error statuses, shared by every surface."""

from __future__ import annotations

from typing import Any

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad input: invalid base64, not an image, a truncated image, or invalid spatial_refs.",
    401: "API keys are configured and the request carries none or a wrong one.",
    404: "The request names a model this server does not serve.",
    413: "The request body or the image's pixel count is over the server's limit.",
    422: "A required field is missing or a field has the wrong type.",
    429: "The request queue is full; retry after the Retry-After seconds.",
    500: "Unexpected server error.",
    501: "The skill is not available in the served model.",
    503: "The model is not loaded and warmed up yet; retry after the Retry-After seconds.",
    504: "The request did not finish within the server's deadline.",
}


def error_responses(*statuses: int, model: Any) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the surface's error body model."""
    return {s: {"model": model, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}
