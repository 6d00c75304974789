"""Validation of spatial_refs: points and boxes in [0, 1], only with an image."""

from __future__ import annotations

import math

import pytest

from moondream_server.api.errors import ApiError
from moondream_server.api.spatial_refs import check_spatial_refs


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
