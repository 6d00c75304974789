"""Token choice: greedy at temperature 0, else temperature + top-p (nucleus) sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MAX_TOKENS = 768
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.3
DEFAULT_MAX_OBJECTS = 50


@dataclass(frozen=True)
class TextSettings:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_objects: int = DEFAULT_MAX_OBJECTS

    @classmethod
    def parse(cls, settings: dict[str, Any] | None) -> TextSettings:
        """Validate a reference-style settings dict; unknown keys are rejected, None means default."""
        settings = dict(settings or {})
        if settings.pop("variant", None) is not None:
            raise ValueError("LoRA variants are not supported by this server")
        unknown = set(settings) - {"temperature", "top_p", "max_tokens", "max_objects"}
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        values = {k: v for k, v in settings.items() if v is not None}
        parsed = cls(**values)
        if isinstance(parsed.temperature, bool) or not isinstance(parsed.temperature, int | float):
            raise ValueError("temperature must be a number")
        if not 0.0 <= parsed.temperature <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if isinstance(parsed.top_p, bool) or not isinstance(parsed.top_p, int | float):
            raise ValueError("top_p must be a number")
        if not 0.0 < parsed.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        for name in ("max_tokens", "max_objects"):
            value = getattr(parsed, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        return parsed


def choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> int:
    """Pick the next token id from float logits [vocab]."""
    if temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Drop every entry whose cumulative mass *before* it already exceeds top_p.
    sorted_probs[(torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > top_p] = 0.0
    sorted_probs /= sorted_probs.sum()
    pick = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[pick].item())
