"""Same-run A/B of two source trees at the engine level: one fresh-image caption and the query
about an image already seen, on the full-size random checkpoint.

    .venv/bin/python benchmarks/engine_ab.py --tree /path/to/old/tree --tree . [--rounds 2]

Each tree runs in its own process (PYTHONPATH=<tree>/src), one process at a time (a full-size
model each), in a palindromic order (A B B A, or A B C C B A for three trees) so that the
machine's drift lands on all of them alike. A worker
starts the tree's default engine through ``engine.loader.create_engine`` (the public path the
server takes), then times ``--fresh`` captions of new small images and ``--seen`` questions
about the last of them (an image-cache hit). Printed: per-run medians and the B/A ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from model_bench import DEFAULT_CACHE, ensure_checkpoint


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from moondream_server.engine.loader import create_engine
    from moondream_server.engine.types import SamplingSettings
    from moondream_server.settings import Settings

    settings = Settings(model=str(args.model), device="cpu", threads=args.threads)
    engine = create_engine(settings)
    greedy = SamplingSettings(temperature=0.0, max_tokens=args.tokens)

    def image(seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))

    async def main() -> dict[str, Any]:
        await engine.start()
        try:
            fresh: list[float] = []
            for i in range(args.fresh):
                im = image(1000 + i)
                t0 = time.perf_counter()
                await engine.caption(im, "normal", greedy)
                fresh.append(time.perf_counter() - t0)
            seen: list[float] = []
            for i in range(args.seen):
                t0 = time.perf_counter()
                await engine.query(
                    im, f"What is in corner {i}?", reasoning=False, spatial_refs=[], settings=greedy
                )
                seen.append(time.perf_counter() - t0)
            return {"fresh_s": fresh, "seen_s": seen}
        finally:
            await engine.stop()

    print(json.dumps(asyncio.run(main())), flush=True)


def run_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{Path(__file__).parent}"}
    cmd = [sys.executable, __file__, "--worker", "--model", str(args.model), "--size", str(args.size)]
    cmd += ["--tokens", str(args.tokens), "--fresh", str(args.fresh), "--seen", str(args.seen)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", type=Path, action="append", default=[], help="a source tree; first = baseline")
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--rounds", type=int, default=2, help="A B B A per round")
    p.add_argument("--size", type=int, default=378, help="side of the square test images")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--fresh", type=int, default=2)
    p.add_argument("--seen", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.model = ensure_checkpoint(args.model)
    labels = [chr(ord("A") + i) for i in range(len(args.tree))]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    order = (labels + labels[::-1]) * args.rounds
    for label in order:
        result = run_tree(args.tree[labels.index(label)].resolve(), args)
        runs[label].append(result)
        print(label, json.dumps(result), flush=True)
    summary: dict[str, Any] = {"cpu": cpu_name(), "order": "".join(order)}
    for key in ("fresh_s", "seen_s"):
        medians = {label: statistics.median(v for r in runs[label] for v in r[key]) for label in labels}
        summary[key] = {label: round(m, 3) for label, m in medians.items()}
        for label in labels[1:]:
            summary[key][f"{label}/A"] = round(medians[label] / medians["A"], 3)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
