"""The three networks of Moondream2 under the official parameter names."""

from __future__ import annotations

from torch import nn

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.region import RegionModel
from moondream_server.model.text import TextModel
from moondream_server.model.vision import VisionModel


class MoondreamNet(nn.Module):
    """The three networks; parameter names equal the official keys without ``model.``."""

    def __init__(self, config: MoondreamConfig) -> None:
        super().__init__()
        self.vision = VisionModel(config.vision)
        self.text = TextModel(config.text)
        self.region = RegionModel(config.region)
