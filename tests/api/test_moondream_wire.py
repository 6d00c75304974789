"""Wire conversion of coordinates and reasoning shared by the Moondream surfaces."""

from __future__ import annotations

import math

from moondream_server.api.moondream_wire import boxes_out, points_out, reasoning_out
from moondream_server.engine.types import Box, GroundingSpan, Point, Reasoning


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
