"""A request's sampling settings as the API hands them over: None is the model's default."""

from __future__ import annotations

import pytest

from moondream_server.engine.params import SamplingSettings
from moondream_server.model.params import TextSettings


def test_unset_values_take_the_models_defaults() -> None:
    defaults = TextSettings(temperature=0.2, top_p=0.9, max_tokens=100, max_objects=7)
    assert SamplingSettings().resolve(defaults) == defaults
    got = SamplingSettings(temperature=0.0, max_objects=2).resolve(defaults)
    assert got == TextSettings(temperature=0.0, top_p=0.9, max_tokens=100, max_objects=2)


@pytest.mark.parametrize(
    "values",
    [{"temperature": -0.5}, {"temperature": 11.0}, {"top_p": 0.0}, {"max_tokens": 0}, {"max_objects": 1001}],
)
def test_values_outside_the_bounds_are_refused_when_built(values: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(values))):
        SamplingSettings(**values)  # type: ignore[arg-type]
