"""Throughput of the batching engine against its one-at-a-time preset, in process (run by hand).

    PYTHONPATH=src:. .venv/bin/python benchmarks/engine_bench.py [--size small|tiny] [--requests 16]

A random checkpoint in the official layout (end-of-text disabled, so every request runs to
its token budget) is written to a temporary folder; both engines load it and serve the same
concurrent mix of image captions (4 distinct images, each asked twice) and text-only queries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from moondream_server.engine.loader import create_engine
from moondream_server.engine.params import SamplingSettings
from moondream_server.model import MoondreamConfig
from moondream_server.model.random_weights import write_checkpoint
from moondream_server.settings import Settings

TINY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "moondream2-tiny"

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},
    # ~1/16 of Moondream2's text compute per token, same vocab and context
    "small": {
        "text": {"dim": 512, "ff_dim": 2048, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8},
        "vision": {
            "enc_dim": 192,
            "enc_n_layers": 6,
            "enc_ff_dim": 768,
            "enc_n_heads": 4,
            "proj_inner_dim": 512,
            "proj_out_dim": 512,
        },
        "region": {"dim": 512},
    },
}


def checkpoint(size: str, folder: Path) -> Path:
    data = json.loads((TINY / "config.json").read_text())
    for section, values in SIZES[size].items():
        data[section].update(values)
    config = MoondreamConfig.from_dict(data)
    return write_checkpoint(folder, config, TINY / "tokenizer.json", never_stop=True)


async def workload(engine: Any, n: int, tokens: int, distinct: bool = False) -> dict[str, float]:
    sources = [Image.open(TINY / "images" / f"img{i}.png").convert("RGB") for i in (1, 2, 4, 5)]
    if distinct:  # every caption gets its own pixels: the image cache cannot help
        images = [sources[i % 4].resize((320 + i, 240)) for i in range(n)]
    else:
        images = [im.resize((320, 240)) for im in sources]
    s = SamplingSettings(temperature=0.0, max_tokens=tokens)
    latencies: list[float] = []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        if i % 2 == 0:
            await engine.caption(images[(i // 2) % len(images)], "normal", s)
        else:
            await engine.query(None, f"Question number {i}?", reasoning=False, spatial_refs=[], settings=s)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "tokens_per_s": round(n * tokens / wall, 1),
        "mean_latency_s": round(statistics.mean(latencies), 2),
        "max_latency_s": round(max(latencies), 2),
    }


async def run(kind: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    settings = Settings(
        engine=kind,  # type: ignore[arg-type]
        model=str(path),
        device="cpu",
        dtype="float32",
        max_queue=1000,
        max_batch_size=args.batch,
        threads=args.threads,
    )
    engine = create_engine(settings)
    await engine.start()
    try:
        await workload(engine, 2, 4)  # warm both paths
        return await workload(engine, args.requests, args.tokens, args.distinct)
    finally:
        await engine.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distinct", action="store_true", help="a different image for every caption")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(args.size, Path(tmp))
        for kind in ("serial", "batched"):
            print(kind, asyncio.run(run(kind, path, args)), flush=True)


if __name__ == "__main__":
    main()
