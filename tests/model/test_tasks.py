"""Typed tasks: what cannot be served is refused when the task is built, before any model work."""

from __future__ import annotations

import pytest

from moondream_server.model.params import TextSettings
from moondream_server.model.tasks import CaptionTask, QueryTask, RegionTask


def test_caption_lengths_are_the_models_three() -> None:
    for length in ("short", "normal", "long"):
        assert CaptionTask(length).length == length  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="medium"):
        CaptionTask("medium")  # type: ignore[arg-type]


def test_spatial_refs_need_an_image() -> None:
    assert QueryTask("where?", with_image=True, spatial_refs=((0.5, 0.5),)).spatial_refs == ((0.5, 0.5),)
    assert QueryTask("hello?", with_image=False).spatial_refs == ()
    with pytest.raises(ValueError, match="need an image"):
        QueryTask("where?", with_image=False, spatial_refs=((0.5, 0.5),))


def test_tasks_carry_resolved_settings_and_say_whether_they_need_an_image() -> None:
    settings = TextSettings(max_objects=3)
    region = RegionTask("point", "cat", settings)
    assert region.settings.max_objects == 3 and region.with_image
    assert CaptionTask().with_image and CaptionTask().settings == TextSettings()
    assert not QueryTask("q", with_image=False).with_image
