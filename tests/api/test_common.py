"""Helpers shared by the routes: spatial_refs validation, wire conversion of coordinates."""

from __future__ import annotations

import math

import pytest

from moondream_server.api.common import boxes_out, check_spatial_refs, points_out, reasoning_out
from moondream_server.api.errors import ApiError
from moondream_server.engine.types import Box, GroundingSpan, Point, Reasoning


def test_valid_spatial_refs_become_tuples() -> None:
    refs = check_spatial_refs([[0, 1], [0.1, 0.2, 0.1, 0.9]], has_image=True)
    assert refs == [(0.0, 1.0), (0.1, 0.2, 0.1, 0.9)]
    assert check_spatial_refs(None, has_image=False) == []
    assert check_spatial_refs([], has_image=False) == []


@pytest.mark.parametrize(
    "refs",
    [
        [[0.5]],
        [[0.1, 0.2, 0.3]],
        [[0.1, 0.2, 0.3, 0.4, 0.5]],
        [[1.01, 0.5]],
        [[0.5, -0.01]],
        [[math.nan, 0.5]],
        [[math.inf, 0.5]],
        [[0.5, 0.1, 0.4, 0.2]],
        [[0.1, 0.5, 0.2, 0.4]],
    ],
)
def test_invalid_spatial_refs(refs: list[list[float]]) -> None:
    with pytest.raises(ApiError) as caught:
        check_spatial_refs(refs, has_image=True)
    assert caught.value.status == 400 and caught.value.param == "spatial_refs"


def test_spatial_refs_need_an_image() -> None:
    with pytest.raises(ApiError):
        check_spatial_refs([[0.5, 0.5]], has_image=False)


def test_non_finite_coordinates_are_dropped_not_sent() -> None:
    boxes = [Box(0.1, 0.2, 0.3, 0.4), Box(math.nan, 0.2, 0.3, 0.4), Box(0.1, 0.2, math.inf, 0.4)]
    assert [b.model_dump() for b in boxes_out(boxes)] == [
        {"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}
    ]
    points = [Point(0.5, 0.5), Point(0.5, -math.inf)]
    assert [p.model_dump() for p in points_out(points)] == [{"x": 0.5, "y": 0.5}]
    r = reasoning_out(Reasoning("abc", [GroundingSpan(0, 2, [(0.1, 0.2), (math.nan, 0.3)])]))
    assert r is not None and r.grounding[0].points == [(0.1, 0.2)]
    assert reasoning_out(None) is None
