"""Moondream2 configuration, with the real 2025-06-21 defaults.

A JSON file in the shape of the official ``config_md2.json`` (``{"text", "vision", "region",
"tokenizer"}``) overrides these; that is how tiny test checkpoints differ from the real model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_out_dim: int = 2048
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4
    proj_inner_dim: int = 8192

    @property
    def grid(self) -> int:
        """Patches per crop side (27). The reference reuses enc_n_layers for this; we do not."""
        return self.crop_size // self.enc_patch_size


@dataclass(frozen=True)
class TextConfig:
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 32
    prefix_attn: int = 730
    group_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class RegionConfig:
    dim: int = 2048
    coord_feat_dim: int = 256
    coord_out_dim: int = 1024
    size_feat_dim: int = 512
    size_out_dim: int = 2048
    inner_dim: int = 8192
    group_size: int | None = None


def _default_templates() -> dict[str, Any]:
    return {
        "caption": {
            "short": [1, 32708, 2, 12492, 3],
            "normal": [1, 32708, 2, 6382, 3],
            "long": [1, 32708, 2, 4059, 3],
        },
        "query": {"prefix": [1, 15381, 2], "suffix": [3]},
        "detect": {"prefix": [1, 7235, 476, 2], "suffix": [3]},
        "point": {"prefix": [1, 2581, 2], "suffix": [3]},
    }


@dataclass(frozen=True)
class TokenizerConfig:
    bos_id: int = 0
    eos_id: int = 0
    answer_id: int = 3
    thinking_id: int = 4
    coord_id: int = 5
    size_id: int = 6
    start_ground_points_id: int = 7
    end_ground_id: int = 9
    templates: dict[str, Any] = field(default_factory=_default_templates)


@dataclass(frozen=True)
class MoondreamConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoondreamConfig:
        unknown = set(data) - {"text", "vision", "region", "tokenizer"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        config = cls(
            text=_build(TextConfig, data.get("text", {}), "text"),
            vision=_build(VisionConfig, data.get("vision", {}), "vision"),
            region=_build(RegionConfig, data.get("region", {}), "region"),
            tokenizer=_build(TokenizerConfig, data.get("tokenizer", {}), "tokenizer"),
        )
        config.check_supported()
        return config

    def check_supported(self) -> None:
        """Refuse what the code would load but not honour: better no model than a wrong one."""
        for section, group_size in (("text", self.text.group_size), ("region", self.region.group_size)):
            if group_size is not None:
                raise ValueError(
                    f"config section {section!r} sets group_size={group_size}: quantized checkpoints "
                    "are not supported; use the bf16 checkpoint"
                )

    @classmethod
    def from_json(cls, path: str | Path) -> MoondreamConfig:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        # The HF repo's config.json is the transformers wrapper's; its model config is empty.
        if "text" not in data and "vision" not in data and "region" not in data:
            return cls()
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_T = TypeVar("_T")


def _build(kind: type[_T], values: Any, section: str) -> _T:
    if not isinstance(values, dict):
        raise ValueError(f"config section {section!r} must be an object")
    names = {f.name for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown keys in config section {section!r}: {sorted(unknown)}")
    return kind(**values)
