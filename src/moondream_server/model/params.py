"""A task's parameters: sampling settings with their defaults and their one set of bounds,
spatial references and caption lengths.

Torch-free, so the API's schemas show these very bounds (through ``engine/params.py``) without
importing the model. Every value of these types is valid once built: the API edge builds them,
the model's dict API builds them from its arguments, and the decode programs trust them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

CaptionLength = Literal["short", "normal", "long"]
CAPTION_LENGTHS: tuple[CaptionLength, ...] = get_args(CaptionLength)

# A point (x, y) or a box (x_min, y_min, x_max, y_max), normalised to [0, 1].
PointRef = tuple[float, float]
BoxRef = tuple[float, float, float, float]
SpatialRef = PointRef | BoxRef


@dataclass(frozen=True)
class Bound:
    """The allowed range of one setting: above ``ge`` (inclusive) or ``gt`` (exclusive), up to ``le``."""

    name: str
    le: float
    ge: float | None = None
    gt: float | None = None
    integer: bool = False

    def check(self, value: object) -> None:
        """Raise ValueError unless ``value`` is a number (an int if ``integer``) in range."""
        wrong = isinstance(value, bool) or (self.integer and not isinstance(value, int))
        if wrong or not isinstance(value, int | float):
            raise ValueError(f"{self.name} must be {'an integer' if self.integer else 'a number'}")
        number = float(value)
        low_ok = (self.ge is None or number >= self.ge) and (self.gt is None or number > self.gt)
        if not (low_ok and number <= self.le):
            raise ValueError(f"{self.name} must be {self.describe()}")

    def describe(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        return f"{low} and <= {self.le:g}"


# Text a prompt may carry, in characters, checked before it is tokenized: tokenizing costs ~3 s
# of CPU per MB (and the ids ~40 bytes per token), yet no question longer than this could fit
# the 2,048-token context. What does fit is then checked on the token count, before embedding.
MAX_QUESTION_CHARS = 16_384
MAX_OBJECT_CHARS = 2_048


def check_text_length(what: str, text: str, limit: int) -> None:
    """Raise ValueError, naming the limit, when ``text`` is longer than ``limit`` characters."""
    if len(text) > limit:
        raise ValueError(f"the {what} is {len(text):,} characters long; at most {limit:,} are accepted")


TEMPERATURE = Bound("temperature", ge=0.0, le=10.0)
TOP_P = Bound("top_p", gt=0.0, le=1.0)
MAX_TOKENS = Bound("max_tokens", ge=1, le=8192, integer=True)
MAX_OBJECTS = Bound("max_objects", ge=1, le=1000, integer=True)
BOUNDS: tuple[Bound, ...] = (TEMPERATURE, TOP_P, MAX_TOKENS, MAX_OBJECTS)


@dataclass(frozen=True)
class TextSettings:
    """Resolved sampling settings (the reference model's defaults); checked when built."""

    temperature: float = 0.5
    top_p: float = 0.3
    max_tokens: int = 768
    max_objects: int = 50

    def __post_init__(self) -> None:
        for bound in BOUNDS:
            bound.check(getattr(self, bound.name))

    def override(
        self,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        max_objects: int | None = None,
    ) -> TextSettings:
        """These settings with every value that is not None replaced (and checked)."""
        return TextSettings(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            max_objects=self.max_objects if max_objects is None else max_objects,
        )

    @classmethod
    def parse(cls, settings: Mapping[str, Any] | None) -> TextSettings:
        """From a reference-style settings dict; unknown keys are refused, None means default."""
        values: dict[str, Any] = dict(settings or {})
        if values.pop("variant", None) is not None:
            raise ValueError("LoRA variants are not supported by this server")
        unknown = set(values) - {b.name for b in BOUNDS}
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return dataclasses.replace(cls(), **{k: v for k, v in values.items() if v is not None})


def spatial_ref(values: Sequence[object]) -> SpatialRef:
    """A point [x, y] or a box [x_min, y_min, x_max, y_max]: finite, in [0, 1], not inverted."""
    if len(values) not in (2, 4):
        raise ValueError(f"must be [x, y] or [x_min, y_min, x_max, y_max], got {len(values)} values")
    numbers: list[float] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("values must be numbers")
        numbers.append(float(v))
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in numbers):
        raise ValueError("values must be finite and within [0, 1]")
    if len(numbers) == 2:
        return (numbers[0], numbers[1])
    x_min, y_min, x_max, y_max = numbers
    if x_min > x_max or y_min > y_max:
        raise ValueError("is an inverted box (x_min > x_max or y_min > y_max)")
    return (x_min, y_min, x_max, y_max)


def spatial_refs(
    values: Sequence[Sequence[object]] | None, *, with_image: bool = True
) -> tuple[SpatialRef, ...]:
    """Every reference checked; a message names the first bad one (``spatial_refs[i] ...``)."""
    refs_need_image(values, with_image)
    out: list[SpatialRef] = []
    for i, ref in enumerate(values or ()):
        try:
            out.append(spatial_ref(ref))
        except ValueError as exc:
            raise ValueError(f"spatial_refs[{i}] {exc}") from None
    return tuple(out)


def refs_need_image(refs: Sequence[object] | None, with_image: bool) -> None:
    """Spatial references point into an image: a question without one cannot have them."""
    if refs and not with_image:
        raise ValueError("spatial_refs need an image")
