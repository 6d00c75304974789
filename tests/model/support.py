"""Paths and readers shared by the model tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "moondream2-tiny"
TINY_MH = FIXTURES / "moondream2-tiny-mh"
TOKENIZER = TINY / "tokenizer.json"


def golden(folder: Path, sub: str = "") -> dict[str, Any]:
    with open(folder / sub / "expected.json", encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]
