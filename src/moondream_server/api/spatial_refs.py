"""Validating a request's ``spatial_refs`` (points and boxes that point the model at a region)."""

from __future__ import annotations

from collections.abc import Sequence

from moondream_server.api.errors import ApiError
from moondream_server.engine.params import SpatialRef, spatial_refs


def check_spatial_refs(
    refs: Sequence[Sequence[float]] | None, *, has_image: bool, param: str = "spatial_refs"
) -> list[SpatialRef]:
    """2 values (a point) or 4 (a box), finite, in [0, 1], boxes not inverted; needs an image."""
    try:
        return list(spatial_refs(refs, with_image=has_image))
    except ValueError as exc:  # the message names the reference: "spatial_refs[i] ..."
        raise ApiError(400, str(exc), code="invalid_spatial_refs", param=param) from None
