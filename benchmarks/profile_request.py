"""Where one short request's time goes: the batched engine's path without HTTP, under the profiler.

Runs the scheduler inline (``run_once``) over a ``MoondreamRuntime`` on the full-size random
checkpoint: a short answer (--tokens) about a fresh image, the request the HTTP benchmark times.
Prints the wall time of each scheduler iteration and the profiler's top operators by self CPU
time and by device time; writes a Chrome trace with --trace.

    python3 benchmarks/profile_request.py --device cuda --dtype bfloat16

Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import DEFAULT_CACHE, ensure_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE, help="full-size checkpoint folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", default="640x480")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=8, help="KV pool slots (the engine's max_batch_size)")
    p.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled request here")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument(
        "--concurrent", type=int, default=0, help="also: this many requests on distinct images at once"
    )
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile

    from moondream_server.engine.scheduler import Request, Scheduler
    from moondream_server.model import load
    from moondream_server.model.params import TextSettings
    from moondream_server.model.tasks import QueryTask

    model = load(str(ensure_checkpoint(args.model)), device=args.device, dtype=args.dtype)
    gpu = model.device.type == "cuda"
    # The batched engine's GPU settings (engine/batched.py): 4 images per vision job, one pass.
    crops = 4 * (model.config.vision.max_crops + 1)
    rt = model.runtime(max_vision_crops=crops, kv_pool_slots=args.slots if gpu else 0)
    rt.warm()
    sched = Scheduler(
        rt, max_batch_size=args.slots, max_step_tokens=4096, max_images_per_step=4, decode_first_s=0.0
    )
    w, h = (int(v) for v in args.size.split("x"))
    settings = TextSettings(max_tokens=args.tokens, temperature=0.0)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def one(seed: int) -> list[float]:
        """One short answer about a fresh image; wall time of every scheduler iteration."""
        img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
        req = Request(
            program=rt.program(QueryTask("Describe the colours.", with_image=True, settings=settings)),
            image=rt.prepare(img),
            image_key=rt.image_key(img),
            deadline=float("inf"),
        )
        sched.submit(req)
        times = []
        with rt.session():
            while True:
                sync()
                t = time.perf_counter()
                more = sched.run_once()
                sync()
                times.append(time.perf_counter() - t)
                if not more:
                    break
        assert req.error is None, req.error
        return times

    for seed in range(3):  # warm-up
        one(seed)
    walls = []
    for seed in range(10, 15):
        t = time.perf_counter()
        one(seed)
        walls.append(time.perf_counter() - t)
    img = Image.fromarray(np.random.default_rng(99).integers(0, 256, (h, w, 3), dtype=np.uint8))
    t = time.perf_counter()
    rt.prepare(img)
    prep = time.perf_counter() - t
    print(f"\nprofile_request: {args.size}, {args.tokens} tokens, {args.dtype} on {model.device}")
    print(f"  CPU preprocessing (crops) {prep * 1000:.1f} ms (not in the scheduler times below)")
    print(f"  scheduler, fresh image, short answer: {sorted(walls)[len(walls) // 2] * 1000:.1f} ms median")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        steps = one(1234)
    print("  iterations (ms): " + " ".join(f"{s * 1000:.1f}" for s in steps))
    out = io.StringIO()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows), file=out)
    if gpu:
        print(table.table(sort_by="self_device_time_total", row_limit=args.rows), file=out)
    print(out.getvalue())
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    if args.concurrent:
        concurrent(args, rt, sched, w, h, settings, sync)


def concurrent(
    args: argparse.Namespace, rt: Any, sched: Any, w: int, h: int, settings: Any, sync: Any
) -> None:
    """N short requests on N distinct images submitted at once, prepared beforehand: the engine's
    throughput without HTTP, and where the scheduler's iterations spend their time."""
    import numpy as np
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile

    from moondream_server.engine.scheduler import Request
    from moondream_server.model.tasks import QueryTask

    def batch(seed: int) -> list[Any]:
        reqs = []
        for i in range(args.concurrent):
            img = Image.fromarray(np.random.default_rng(seed + i).integers(0, 256, (h, w, 3), dtype=np.uint8))
            program = rt.program(QueryTask("Describe the colours.", with_image=True, settings=settings))
            reqs.append(
                Request(
                    program=program, image=rt.prepare(img), image_key=rt.image_key(img), deadline=float("inf")
                )
            )
        return reqs

    def drain(reqs: list[Any]) -> tuple[float, dict[str, list[float]]]:
        kinds: dict[str, list[float]] = {"vision": [], "vision+prefill": [], "prefill": [], "decode": []}
        for r in reqs:
            sched.submit(r)
        t0 = time.perf_counter()
        with rt.session():
            while True:
                vision, prefills = sched.stats.vision_steps, sched.stats.image_prefills
                t = time.perf_counter()
                more = sched.run_once()
                sync()
                dt = time.perf_counter() - t
                did_vision = sched.stats.vision_steps > vision
                did_prefill = sched.stats.image_prefills > prefills
                if did_vision or did_prefill or more:
                    kind = "vision+prefill" if did_vision and did_prefill else "vision" if did_vision else ""
                    kinds[kind or ("prefill" if did_prefill else "decode")].append(dt)
                if not more:
                    break
        assert all(r.error is None for r in reqs), [r.error for r in reqs if r.error][:1]
        return time.perf_counter() - t0, kinds

    drain(batch(5000))  # warm-up: captures, allocator
    wall, kinds = drain(batch(6000))
    n = args.concurrent
    print(f"\n{n} requests on distinct images at once (prepared beforehand, no HTTP):")
    print(f"  {wall:.3f} s -> {n / wall:.1f} requests/s")
    for kind, ts in kinds.items():
        if ts:
            print(
                f"  {kind:14s} iterations {len(ts):4d}, {sum(ts) * 1000:8.1f} ms in all, "
                f"{sum(ts) / len(ts) * 1000:6.2f} ms each"
            )
    reqs = batch(7000)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        drain(reqs)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(table.table(sort_by="self_device_time_total", row_limit=12))


if __name__ == "__main__":
    main()
