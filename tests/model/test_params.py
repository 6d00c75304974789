"""A task's parameters: one set of bounds, reference defaults, spatial references."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from moondream_server.model.params import (
    MAX_TOKENS,
    TEMPERATURE,
    TOP_P,
    TextSettings,
    spatial_ref,
    spatial_refs,
)


def test_defaults_are_the_reference_models() -> None:
    assert TextSettings() == TextSettings(temperature=0.5, top_p=0.3, max_tokens=768, max_objects=50)


@pytest.mark.parametrize(
    ("bound", "good", "bad"),
    [
        (TEMPERATURE, [0, 0.0, 2.5, 10], [-0.1, 10.01, "hot", True, math.nan]),
        (TOP_P, [0.01, 1], [0, -1, 1.5, None]),
        (MAX_TOKENS, [1, 8192], [0, -3, 8193, 2.5, False]),
    ],
)
def test_bounds_accept_and_refuse(bound: object, good: list[object], bad: list[object]) -> None:
    from moondream_server.model.params import Bound

    assert isinstance(bound, Bound)
    for value in good:
        bound.check(value)
    for value in bad:
        with pytest.raises(ValueError, match=bound.name):
            bound.check(value)


def test_override_keeps_unset_values_and_checks_set_ones() -> None:
    base = TextSettings()
    assert base.override(max_tokens=12) == TextSettings(max_tokens=12)
    assert base.override() == base
    with pytest.raises(ValueError, match="top_p"):
        base.override(top_p=0.0)


def test_parse_takes_reference_dicts() -> None:
    assert TextSettings.parse({"temperature": 0, "max_tokens": None}) == TextSettings(temperature=0)
    for bad in ({"colour": 1}, {"variant": "lora"}, {"max_objects": 0}):
        with pytest.raises(ValueError):
            TextSettings.parse(bad)


def test_spatial_refs_are_checked_and_typed() -> None:
    assert spatial_refs([[0, 1], [0.1, 0.2, 0.1, 0.9]]) == ((0.0, 1.0), (0.1, 0.2, 0.1, 0.9))
    assert spatial_refs(None) == ()
    for bad in ([0.5], [0.1, 0.2, 0.3], [1.01, 0.5], [math.inf, 0], [0.5, 0.1, 0.4, 0.2], ["a", 0]):
        with pytest.raises(ValueError):
            spatial_ref(bad)
    with pytest.raises(ValueError, match=r"spatial_refs\[1\]"):
        spatial_refs([[0.5, 0.5], [2.0, 0.5]])


def test_importing_the_params_does_not_import_torch() -> None:
    """The API's schemas import these bounds; the API process must not pay for torch on import."""
    code = "import sys, moondream_server.engine.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
