"""Surfaces are found by their packages, and each path's errors take its surface's shape."""

from __future__ import annotations

import pytest

from moondream_server.api import errors
from moondream_server.api.errors import ErrorInfo, error_body_for, register_error_shape
from moondream_server.api.surface import discover_surfaces


def test_every_surface_package_is_found() -> None:
    names = [s.name for s in discover_surfaces()]
    assert {"cloud", "seed"} <= set(names)
    assert names == sorted(names)


def test_the_longest_registered_prefix_chooses_the_error_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "_SHAPES", {})  # this test's registrations end with it
    for surface in discover_surfaces():
        body = surface.error_body
        if body is not None:
            for prefix in surface.error_prefixes:
                register_error_shape(prefix, body)
    register_error_shape("/v1/test-shape", lambda e: {"only": e.message})
    error = ErrorInfo(400, "bad", code="c", param="p")
    assert error_body_for("/v1/test-shape/x")(error) == {"only": "bad"}
    assert error_body_for("/v1/caption")(error) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "p", "code": "c"}
    }
    assert error_body_for("/v1")(error)["error"]["message"] == "bad"
    # a path that merely starts with the same letters is not under the prefix
    assert error_body_for("/v10/caption")(error) == {"detail": "bad"}
    assert error_body_for("/caption")(error) == {"detail": "bad"}
