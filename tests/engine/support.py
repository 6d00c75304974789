"""Helpers shared by the engine tests that run the real tiny checkpoint."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from moondream_server.engine.batched import BatchedEngine
from moondream_server.engine.types import EngineInfo
from moondream_server.model import Moondream, load

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "moondream2-tiny"


# CI runs on the CPU; MOONDREAM_TEST_DEVICE=cuda runs these tests on a GPU by hand.
DEVICE = os.environ.get("MOONDREAM_TEST_DEVICE", "cpu")


def load_tiny(path: Path = TINY) -> Moondream:
    return load(str(path), device=DEVICE, dtype=torch.float32)


T = TypeVar("T")


def make_engine(path: Path = TINY, **kw: Any) -> BatchedEngine:
    kw.setdefault("warmup", False)
    kw.setdefault("max_batch_size", 8)
    return BatchedEngine(lambda: load_tiny(path), info=EngineInfo("tiny", None, DEVICE, "float32"), **kw)


def with_engine(engine: BatchedEngine, body: Callable[[BatchedEngine], Awaitable[T]]) -> T:
    async def main() -> T:
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def collect(pieces: Any) -> list[str]:
    out = []
    try:
        async for p in pieces:
            out.append(p)
    finally:
        await pieces.aclose()
    return out
