"""The checkpoint's configuration: what the code cannot honour is refused at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moondream_server.model import MoondreamConfig, load

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "moondream2-tiny"


@pytest.mark.parametrize("section", ["text", "region"])
def test_quantized_checkpoints_are_refused_at_load(tmp_path: Path, section: str) -> None:
    """``group_size`` marks a quantized checkpoint; loading it as if it were not would give wrong
    answers, so loading stops with a message that names the setting."""
    folder = tmp_path / "quantized"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    config[section]["group_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"{section}.*group_size=128.*quantized checkpoints are not supported"
    ):
        load(folder, device="cpu")


def test_the_tiny_checkpoints_config_is_supported() -> None:
    config = MoondreamConfig.from_json(TINY / "config.json")
    config.check_supported()
    assert config.text.group_size is None and config.region.group_size is None
