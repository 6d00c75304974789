"""Validating a request's ``spatial_refs`` (points and boxes that point the model at a region)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from moondream_server.api.errors import ApiError
from moondream_server.engine.types import SpatialRef


def check_spatial_refs(
    refs: Sequence[Sequence[float]] | None, *, has_image: bool, param: str = "spatial_refs"
) -> list[SpatialRef]:
    """2 values (a point) or 4 (a box), finite, in [0, 1], boxes not inverted; needs an image."""
    if not refs:
        return []
    if not has_image:
        raise ApiError(400, "spatial_refs need an image", code="invalid_spatial_refs", param=param)
    out: list[SpatialRef] = []
    for i, ref in enumerate(refs):
        where = f"{param}[{i}]"
        if len(ref) not in (2, 4):
            raise ApiError(
                400,
                f"{where} must be [x, y] or [x_min, y_min, x_max, y_max], got {len(ref)} values",
                code="invalid_spatial_refs",
                param=param,
            )
        values = [float(v) for v in ref]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise ApiError(
                400,
                f"{where} values must be finite and within [0, 1]",
                code="invalid_spatial_refs",
                param=param,
            )
        if len(values) == 4:
            if values[0] > values[2] or values[1] > values[3]:
                raise ApiError(
                    400,
                    f"{where} is an inverted box (x_min > x_max or y_min > y_max)",
                    code="invalid_spatial_refs",
                    param=param,
                )
            out.append((values[0], values[1], values[2], values[3]))
        else:
            out.append((values[0], values[1]))
    return out
