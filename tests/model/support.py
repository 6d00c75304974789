"""Paths and readers shared by the model tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "moondream2-tiny"
TINY_MH = FIXTURES / "moondream2-tiny-mh"
TOKENIZER = TINY / "tokenizer.json"

# The golden tests run on the CPU in CI; MOONDREAM_TEST_DEVICE=cuda runs them on a GPU by hand.
TEST_DEVICE = os.environ.get("MOONDREAM_TEST_DEVICE", "cpu")


def golden(folder: Path, sub: str = "") -> dict[str, Any]:
    with open(folder / sub / "expected.json", encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total
