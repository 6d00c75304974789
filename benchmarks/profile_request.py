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
    rt = model.runtime(max_vision_crops=32, kv_pool_slots=args.slots if gpu else 0)
    rt.warm()
    sched = Scheduler(rt, max_batch_size=args.slots, max_step_tokens=4096, decode_first_s=0.0)
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


if __name__ == "__main__":
    main()
