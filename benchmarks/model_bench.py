"""Model-level benchmark of the full-size Moondream2 architecture on this machine.

The weights are random (the compute only depends on the shapes): a full-size checkpoint with
end-of-text disabled is written once to a cache folder, so every run decodes exactly --tokens
tokens and detects exactly 4 objects.

Every (dtype, source tree) configuration runs in its own subprocess, so peak RSS is per
configuration and one configuration's allocator state does not colour the next. Pass --src
(repeatable) to time other source trees in the same run, e.g. a ``git worktree`` of the
baseline commit: figures only mean something as ratios against a baseline timed in the same run.

    .venv/bin/python benchmarks/model_bench.py                       # fp32 and bf16
    .venv/bin/python benchmarks/model_bench.py --dtype bf16 --quick  # one pass, no warm-up
    .venv/bin/python benchmarks/model_bench.py --src /tmp/base/src --src src

Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("MOONDREAM_BENCH_MODEL", "/tmp/moondream2-random-full"))
TOKENIZER = ROOT / "tests/fixtures/moondream2-tiny/tokenizer.json"


def ensure_checkpoint(folder: Path) -> Path:
    """Write the full-size random checkpoint (never stops) once; later runs reuse it."""
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(ROOT / "src"))
    from moondream_server.model.config import MoondreamConfig
    from moondream_server.model.random_weights import write_checkpoint

    print(f"writing full-size random checkpoint to {folder} (once, ~4 GB) ...", file=sys.stderr)
    tmp = folder.with_name(folder.name + ".partial")
    write_checkpoint(tmp, MoondreamConfig(), tokenizer_json=TOKENIZER, never_stop=True)
    tmp.rename(folder)
    return folder


# -- worker: one configuration -----------------------------------------------------------------
def _sync() -> None:
    """Wait for queued GPU work, so that wall time covers it (no-op on the CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median wall time of `reps` calls, and the last result."""
    times = []
    out = None
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import numpy as np
    import psutil
    import torch
    from PIL import Image

    import moondream_server
    from moondream_server.model import load
    from moondream_server.model.cuda_graphs import DecodeGraphs
    from moondream_server.model.text import SeqSlice

    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    res: dict[str, Any] = {
        "src": str(Path(moondream_server.__file__).resolve().parents[1]),
        "dtype": args.dtype,
        "cpu_weights": args.cpu_weights or "auto",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
    }
    res["graphs"] = args.graphs
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.cpu_weights:
        kwargs["cpu_weights"] = args.cpu_weights
    t = time.perf_counter()
    m = load(str(args.model), **kwargs)
    res["load_s"] = time.perf_counter() - t
    res["rss_after_load_mb"] = psutil.Process().memory_info().rss / 2**20
    if args.graphs != "auto":  # decode steps through DecodeGraphs (CUDA graphs on a GPU)
        m.decode_graphs = args.graphs == "on"
    graphs_on = m.graphs is not None

    rng = np.random.default_rng(0)
    images = {
        name: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for name in args.images.split(",")
        for w, h in [map(int, name.split("x"))]
    }
    largest = max(images, key=lambda n: images[n].width * images[n].height)
    sections = set(args.sections.split(","))
    settings = {"max_tokens": args.tokens, "temperature": 0.0}

    if not args.quick:  # warm-up: oneDNN primitives, allocator pools, the odd lazy init
        enc = m.encode_image(images[min(images, key=lambda n: images[n].width * images[n].height)])
        m.caption(enc, settings={"max_tokens": 4, "temperature": 0.0})

    # Image encode: vision encoder (crops -> embeddings), then the image prefill (730 positions).
    for name, img in images.items():
        crops = m.crops(img)
        res[f"crops_{name}"] = int(crops.pixels.shape[0])
        vis_s, emb = _timed(partial(m.embed_image, img), reps)
        pre_s, enc = _timed(partial(m.prefill_image, emb), reps)
        res[f"vision_s_{name}"] = vis_s
        res[f"image_prefill_s_{name}"] = pre_s
        res[f"encode_s_{name}"] = vis_s + pre_s

    # Prompt prefill and decode, driven step by step as Moondream.run does (greedy).
    ids = list(m.config.tokenizer.templates["caption"]["normal"])

    def prefill_and_decode() -> tuple[float, float]:
        cache, prefix = m.start_cache(enc, pool=m.graphs.pool if m.graphs is not None else None)
        x = m.ctx.embed(ids)
        _sync()
        t0 = time.perf_counter()
        out = m.step(x, SeqSlice(cache, x.shape[0], prefix=prefix))
        _sync()
        t1 = time.perf_counter()
        for _ in range(args.tokens):
            token = int(torch.argmax(out.logits).item())
            out = m.step(m.ctx.embed([token]), SeqSlice(cache, 1, prefix=prefix))
        _sync()
        return t1 - t0, time.perf_counter() - t1

    if "decode" in sections:
        runs = [prefill_and_decode() for _ in range(reps)]
        res["prompt_tokens"] = len(ids)
        res["prompt_prefill_s"] = statistics.median(r[0] for r in runs)
        decode_s = statistics.median(r[1] for r in runs)
        res["decode_s_per_token"] = decode_s / args.tokens
        res["decode_tokens_per_s"] = args.tokens / decode_s

    batches = [(int(v), False) for v in args.batch.split(",") if v]
    if args.kv_pool:
        batches += [(b, True) for b, _ in batches if b > 1]
    for b, pooled in batches:
        # Batched decode as the engine runs it: b sequences, one new token each, one packed pass
        # (with the KV pool: the decode attention of all b in one call, as the engine does on a GPU).
        # With graphs: one more slot for their padding rows, and the static step.
        pool = m.net.text.new_pool(b + 1 if graphs_on else b) if pooled else None
        batch_graphs = DecodeGraphs(m.net.text, pool, max_batch=b) if pooled and graphs_on and pool else None
        name = f"batch{b}{'_pooled' if pooled else ''}"
        seqs = []
        for _ in range(b):
            cache, prefix = m.start_cache(enc, pool=pool)
            m.step(m.ctx.embed(ids), SeqSlice(cache, len(ids), prefix=prefix))
            seqs.append((cache, prefix))
        steps = max(4, args.tokens // 4)

        def batch_step(
            tokens: torch.Tensor, g: DecodeGraphs | None = batch_graphs, seqs: list[Any] = seqs
        ) -> torch.Tensor:
            if g is not None:
                _, logits = g.step(m.net.text.embed(tokens), [c for c, _ in seqs])
                return torch.argmax(logits, dim=-1)
            hidden = m.net.text(m.net.text.embed(tokens), [SeqSlice(c, 1, prefix=p) for c, p in seqs])
            return torch.argmax(m.net.text.logits(hidden).float(), dim=-1)

        with torch.inference_mode():
            tokens = batch_step(torch.zeros(b, dtype=torch.long, device=args.device))  # (captures)
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                tokens = batch_step(tokens)
            _sync()
            dt = time.perf_counter() - t0
        res[f"{name}_decode_tokens_per_s"] = b * steps / dt
        res[f"{name}_decode_s_per_step"] = dt / steps
        del seqs, pool, batch_graphs

    if "detect" in sections:
        det_s, det = _timed(lambda: m.detect(enc, "cat", settings={"max_objects": 4}), reps)
        res["detect_s_4_objects"] = det_s
        res["detect_objects"] = len(det["objects"])

    if "caption" in sections:
        cap_s, cap = _timed(lambda: m.caption(images[largest], settings=settings), reps)
        res[f"caption_s_{largest}"] = cap_s
        res["caption_tokens"] = args.tokens
        res["caption_chars"] = len(cap["caption"])
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


# -- driver ------------------------------------------------------------------------------------
def table_rows(images: list[str], batches: str) -> list[tuple[str, str]]:
    rows = [("load_s", "load (s)")]
    for n in images:
        rows += [
            (f"vision_s_{n}", f"vision {n} (s)"),
            (f"image_prefill_s_{n}", f"image prefill {n} (s)"),
            (f"encode_s_{n}", f"image encode {n} (s)"),
        ]
    rows += [
        ("prompt_prefill_s", "prompt prefill, 5 tokens (s)"),
        ("decode_s_per_token", "decode (s/token)"),
        ("decode_tokens_per_s", "decode (tokens/s)"),
    ]
    for b in [int(v) for v in batches.split(",") if v]:
        rows += [
            (f"batch{b}_decode_s_per_step", f"decode B={b} (s/step)"),
            (f"batch{b}_decode_tokens_per_s", f"decode B={b} (tokens/s)"),
            (f"batch{b}_pooled_decode_s_per_step", f"decode B={b}, KV pool (s/step)"),
            (f"batch{b}_pooled_decode_tokens_per_s", f"decode B={b}, KV pool (tokens/s)"),
        ]
    rows += [
        ("detect_s_4_objects", "detect, 4 objects (s)"),
    ]
    rows += [(f"caption_s_{n}", f"caption {n} total (s)") for n in images]
    return [*rows, ("peak_rss_mb", "peak RSS (MiB)"), ("peak_gpu_mb", "peak GPU memory (MiB)")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list (float32, bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per caption")
    p.add_argument("--reps", type=int, default=2, help="repetitions per figure (median)")
    p.add_argument("--quick", action="store_true", help="one repetition, no warm-up")
    p.add_argument("--batch", default="8", help="batched-decode sizes to time (comma list, '' = none)")
    p.add_argument("--kv-pool", action="store_true", help="also time batched decode with a KV pool")
    p.add_argument("--images", default="378x378,640x480", help="comma list of WxH test images")
    p.add_argument(
        "--sections", default="decode,detect,caption", help="besides encode: decode, detect, caption"
    )
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE, help="full-size checkpoint folder")
    p.add_argument("--src", action="append", help="source tree(s) to import moondream_server from")
    p.add_argument(
        "--cpu-weights", default="", help="comma list of load(cpu_weights=...) values ('' = default)"
    )
    p.add_argument(
        "--graphs", default="auto", help="comma list of decode-graph modes: auto (on for CUDA), on, off"
    )
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.src = args.src[0] if args.src else None
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    model = ensure_checkpoint(args.model)
    results: list[dict[str, Any]] = []
    for src in args.src or [None]:
        for weights in args.cpu_weights.split(","):
            for dtype, graphs in [(d, g) for d in args.dtype.split(",") for g in args.graphs.split(",")]:
                cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--model", str(model)]
                cmd += ["--threads", str(args.threads), "--tokens", str(args.tokens), "--device", args.device]
                cmd += ["--reps", str(args.reps), "--images", args.images, "--sections", args.sections]
                cmd += ["--batch", args.batch] + (["--kv-pool"] if args.kv_pool else [])
                cmd += ["--quick"] if args.quick else []
                cmd += ["--src", src] if src else []
                cmd += ["--cpu-weights", weights] if weights else []
                cmd += ["--graphs", graphs]
                label = f"{dtype}{'/' + weights if weights else ''}"
                label += f"{'' if graphs == 'auto' else '/graphs-' + graphs}{' @' + src if src else ''}"
                print(f"running {label} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout + proc.stderr, file=sys.stderr)
                    raise SystemExit(f"{label} failed")
                r = json.loads(line.removeprefix("RESULT "))
                r["label"] = label
                results.append(r)

    first = results[0]
    crops = ", ".join(f"{n} -> {first[f'crops_{n}']} crops" for n in args.images.split(","))
    print(
        f"\nMoondream2 {args.model}, torch {first['torch']} on {args.device}, threads {first['threads']}, "
        f"{args.tokens} tokens; {crops}; load average now {os.getloadavg()[0]:.1f}"
    )
    width = max(len(r["label"]) for r in results) + 2
    print(f"{'':32s}" + "".join(f"{r['label']:>{width}s}" for r in results))
    for key, title in table_rows(args.images.split(","), args.batch):
        if not any(key in r for r in results):
            continue
        cells = "".join(f"{r[key]:>{width}.3f}" if key in r else f"{'-':>{width}s}" for r in results)
        print(f"{title:32s}{cells}")
    if len(results) > 1:
        print(f"\nratios against {first['label']} (same run; <1 = faster):")
        for key, title in table_rows(args.images.split(","), args.batch):
            if "tokens_per_s" in key or key == "load_s" or key not in first:
                continue
            cells = "".join(
                f"{r[key] / first[key]:>{width}.2f}" if key in r else f"{'-':>{width}s}" for r in results
            )
            print(f"{title:32s}{cells}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
