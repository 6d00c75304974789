"""Ollama options: which are honoured, which ignored, which refused."""

from __future__ import annotations

from typing import Any

import pytest

from moondream_server.api.errors import ApiError
from moondream_server.api.ollama.options import sampling_settings
from moondream_server.engine.params import SamplingSettings


def test_honoured_options_become_sampling_settings() -> None:
    got = sampling_settings({"temperature": 0, "top_p": 0.5, "num_predict": 20, "num_ctx": 4096})
    assert got == SamplingSettings(temperature=0.0, top_p=0.5, max_tokens=20)
    assert sampling_settings(None) == SamplingSettings()
    assert sampling_settings({"num_predict": -1}).max_tokens is None  # Ollama's "no limit"


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": 40},
        {"seed": 1},
        {"stop": ["x"]},
        {"repeat_penalty": 1.1},
        {"mirostat": 1},
        {"num_predict": 0},
        {"num_predict": 2.5},
        {"num_predict": -3},
        {"temperature": "hot"},
        {"temperature": -1},
        {"num_predict": 10**9},
    ],
)
def test_options_that_cannot_be_honoured_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        sampling_settings(options)
    assert caught.value.status == 400 and caught.value.param is not None
