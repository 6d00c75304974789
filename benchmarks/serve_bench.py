"""HTTP benchmark: the batched engine against the serial (one-at-a-time) baseline, in one run.

Starts ``moondream-server`` once per engine on the full-size random checkpoint (end-of-text
disabled, so every answer has exactly --tokens tokens) and measures through HTTP:

* latency of one caption of a fresh image, and of a second query about that (now seen) image;
* throughput with 1, 4 and 8 concurrent clients, each captioning its own fresh image
  (traffic mix A at 8 clients: 8 clients on 8 distinct images);
* traffic mix B: 8 clients asking 4 questions each about 2 images;
* decode tokens/s (from the responses' metrics and the aggregate), against what this machine's
  measured memory bandwidth allows for one stream (every decode step reads all text weights);
* the server's peak RSS.

The servers inherit the environment, so ``MOONDREAM_CPU_WEIGHTS=auto`` benchmarks the float16
weight storage and ``MOONDREAM_QUANTIZE=int8`` the int8 weights (the bandwidth bound is computed
for them); ``--dtype auto`` is the server's default (bf16 on CPUs with native bf16). Decode
figures come from the responses' ``metrics`` (decode time = the call after its first generated
token).

    .venv/bin/python benchmarks/serve_bench.py                         # 640x480, 32 tokens
    .venv/bin/python benchmarks/serve_bench.py --size 378x378 --tokens 16 --clients 1,4,8
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16       # on a GPU

Prints figures; it is not a test. Images are fresh (never seen) wherever a figure says so, so the
batched engine's image cache only helps where a mix repeats images.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import DEFAULT_CACHE, ensure_checkpoint

QUESTIONS = [
    "What is in this image?",
    "Describe the colours.",
    "How many objects are there?",
    "What is in the background?",
]


class ImageMaker:
    """Fresh random images (a new seed each), as data URLs."""

    def __init__(self, width: int, height: int, fmt: str = "png") -> None:
        self.size = (width, height)
        self.seed = 0
        self.format = fmt

    def __call__(self) -> str:
        self.seed += 1
        rng = np.random.default_rng(self.seed)
        w, h = self.size
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format=self.format.upper())
        return f"data:image/{self.format};base64," + base64.b64encode(buf.getvalue()).decode()


def memory_bandwidth_gbs(device: str) -> float:
    """Read bandwidth of the device that decodes: sum over a 1 GiB float32 array (best of 5)."""
    import torch

    x = torch.ones(2**28, device=device)

    def total() -> None:
        x.sum()
        if x.is_cuda:
            torch.cuda.synchronize()

    total()
    best = min(_time(total) for _ in range(5))
    return 2**28 * 4 / best / 1e9


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def text_weight_bytes(model: Path, dtype: str, cpu_weights: str, device: str) -> int:
    """Bytes of the text decoder's weights as served: what one decode step reads.

    With float16 CPU weights (``MOONDREAM_CPU_WEIGHTS=auto|float16``) the 2-D linear weights take
    2 bytes each; the embedding table is not read by a decode step and is left out.
    """
    from safetensors import safe_open

    if dtype == "auto":  # what the server's load() resolves it to
        from moondream_server.model.precision import cpu_has_native_bf16

        dtype = "bfloat16" if device != "cpu" or cpu_has_native_bf16() else "float32"
    per = 2 if dtype in ("bfloat16", "float16") else 4
    fp16_storage = device == "cpu" and cpu_weights in ("auto", "float16") and dtype == "float32"
    linear_per = 2 if fp16_storage else per
    if device == "cpu" and os.environ.get("MOONDREAM_QUANTIZE") == "int8":
        linear_per = 1
    total = 0
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            shape = f.get_slice(key).get_shape()
            if key.startswith("model.text.") and key != "model.text.wte":
                total += int(np.prod(shape)) * (linear_per if len(shape) == 2 else per)
    return total


class Server:
    def __init__(self, args: argparse.Namespace, engine: str, port: int) -> None:
        # "batched-nopool" / "batched-pool": the batched engine with the KV pool forced off / on;
        # "batched-nographs": with the decode graphs off
        kind, _, variant = engine.partition("-")
        env = dict(os.environ, MOONDREAM_ENGINE=kind)
        if variant in ("nopool", "pool"):
            env["MOONDREAM_KV_POOL"] = "off" if variant == "nopool" else "on"
        elif variant == "nographs":
            env["MOONDREAM_CUDA_GRAPHS"] = "off"
        elif variant:
            raise SystemExit(f"unknown engine variant {engine!r}")
        cmd = [sys.executable, "-m", "moondream_server.api.cli", "--model", str(args.model)]
        cmd += ["--port", str(port), "--engine", kind, "--device", args.device, "--dtype", args.dtype]
        cmd += ["--log-level", "warning", "--request-timeout", "3600", "--max-queue", "256"]
        cmd += ["--max-batch-size", str(args.max_batch_size)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        self.proc = subprocess.Popen(cmd, env=env)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=3600)

    def wait_ready(self, timeout: float = 1800) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if self.client.get("/health/ready").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready in time")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post(server: Server, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    with httpx.Client(base_url=server.url, timeout=3600) as c:
        t = time.perf_counter()
        r = c.post(path, json=body)
        dt = time.perf_counter() - t
    if r.status_code != 200:
        raise SystemExit(f"{path} -> {r.status_code}: {r.text[:300]}")
    return dt, r.json()


def run_clients(
    n_clients: int, work: Callable[[int], list[tuple[float, dict[str, Any]]]]
) -> dict[str, float]:
    """Run `work(i)` for every client concurrently; aggregate latency and token throughput."""
    barrier = threading.Barrier(n_clients)

    def client(i: int) -> list[tuple[float, dict[str, Any]]]:
        barrier.wait()
        return work(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = [r for rs in pool.map(client, range(n_clients)) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(r["metrics"]["output_tokens"] for _, r in results)
    decode_rates = [
        r["metrics"]["output_tokens"] / (r["metrics"]["decode_time_ms"] / 1000)
        for _, r in results
        if r["metrics"]["decode_time_ms"] > 0
    ]
    return {
        "wall_s": wall,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "latency_mean_s": statistics.mean(dt for dt, _ in results),
        "latency_max_s": max(dt for dt, _ in results),
        "per_request_decode_tokens_per_s": statistics.mean(decode_rates) if decode_rates else float("nan"),
    }


def bench_engine(args: argparse.Namespace, engine: str, port: int, make: ImageMaker) -> dict[str, Any]:
    settings = {"max_tokens": args.tokens, "temperature": 0.0}
    server = Server(args, engine, port)
    res: dict[str, Any] = {"engine": engine}

    def ask(image: str) -> tuple[float, dict[str, Any]]:
        """The --task request about one image: a caption, or a question (answers of --tokens)."""
        if args.task == "query":
            return post(
                server, "/v1/query", {"image_url": image, "question": QUESTIONS[1], "settings": settings}
            )
        return post(server, "/v1/caption", {"image_url": image, "settings": settings})

    try:
        res["startup_s"] = server.wait_ready()
        for _ in range(2):  # untimed: the first requests of a fresh server carry one-off costs
            ask(make())
        # One request at a time, each on a fresh image: the median of --single-reps.
        singles = []
        for _ in range(args.single_reps):
            image = make()
            dt, r = ask(image)
            m = r["metrics"]
            singles.append((dt, m["ttft_ms"] / 1000, m["output_tokens"] / (m["decode_time_ms"] / 1000)))
        res["caption_latencies_s"] = [dt for dt, _, _ in singles]
        res["caption_latency_s"] = statistics.median(dt for dt, _, _ in singles)
        res["caption_latency_p90_s"] = sorted(dt for dt, _, _ in singles)[int(0.9 * (len(singles) - 1))]
        res["caption_ttft_s"] = statistics.median(t for _, t, _ in singles)
        res["decode_tokens_per_s_single"] = statistics.median(d for _, _, d in singles)
        dt, r = post(
            server, "/v1/query", {"image_url": image, "question": QUESTIONS[0], "settings": settings}
        )
        res["seen_image_query_latency_s"] = dt

        for n in args.clients:
            per = args.per_client
            images = [make() for _ in range(n * per)]

            def captions(
                i: int, images: list[str] = images, per: int = per
            ) -> list[tuple[float, dict[str, Any]]]:
                return [ask(images[i * per + j]) for j in range(per)]

            print(f"  {engine}: {n} concurrent clients ...", file=sys.stderr, flush=True)
            res[f"clients{n}"] = run_clients(n, captions)

        if not args.no_mix_b:
            pair = [make(), make()]

            def questions(i: int) -> list[tuple[float, dict[str, Any]]]:
                body = {"image_url": pair[i % 2], "settings": settings}
                return [post(server, "/v1/query", {**body, "question": q}) for q in QUESTIONS]

            print(f"  {engine}: 8 clients x 4 questions about 2 images ...", file=sys.stderr, flush=True)
            res["mix_b"] = run_clients(8, questions)
        res["peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE, help="full-size checkpoint folder")
    p.add_argument("--size", default="640x480", help="WxH of the test images")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer (fixed: no end-of-text)")
    p.add_argument("--clients", default="1,4,8", help="concurrency levels (comma list)")
    p.add_argument(
        "--engines", default="serial,batched", help="serial, batched, batched-pool, batched-nopool"
    )
    p.add_argument("--max-batch-size", type=int, default=8, help="the batched engine's largest batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--no-mix-b", action="store_true", help="skip traffic mix B (repeated images)")
    p.add_argument("--single-reps", type=int, default=3, help="single fresh-image captions (median)")
    p.add_argument("--task", default="caption", choices=["caption", "query"], help="what every request asks")
    p.add_argument("--format", default="png", choices=["png", "jpeg"], help="how the test images are sent")
    p.add_argument("--per-client", type=int, default=1, help="requests per client (each a fresh image)")
    p.add_argument("--json", type=Path, help="also write all results here")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c]
    model = ensure_checkpoint(args.model)
    args.model = model

    bandwidth = memory_bandwidth_gbs(args.device)
    cpu_weights = os.environ.get("MOONDREAM_CPU_WEIGHTS", "auto")  # the server default
    weight_bytes = text_weight_bytes(model, args.dtype, cpu_weights, args.device)
    ideal = bandwidth * 1e9 / weight_bytes
    w, h = (int(v) for v in args.size.split("x"))
    results = []
    for i, engine in enumerate(args.engines.split(",")):
        print(f"{engine} engine ...", file=sys.stderr, flush=True)
        results.append(bench_engine(args, engine, args.port + i, ImageMaker(w, h, args.format)))

    print(
        f"\nserve_bench: {model}, {args.device} {args.dtype} (MOONDREAM_CPU_WEIGHTS={cpu_weights}), "
        f"{args.size} images, "
        f"{args.tokens} tokens per answer; "
        f"memory read bandwidth {bandwidth:.1f} GB/s, text weights {weight_bytes / 1e9:.2f} GB "
        f"-> one stream can decode at most {ideal:.2f} tokens/s; load average {os.getloadavg()[0]:.1f}"
    )
    for r in results:
        r["bandwidth_share"] = r["decode_tokens_per_s_single"] / ideal
    rows: list[tuple[str, tuple[str, ...]]] = [
        ("server start + warm-up (s)", ("startup_s",)),
        (f"1 {args.task}, fresh image (s; median of {args.single_reps})", ("caption_latency_s",)),
        ("  its p90 (s)", ("caption_latency_p90_s",)),
        ("  its time to first token (s)", ("caption_ttft_s",)),
        ("  its decode (tokens/s)", ("decode_tokens_per_s_single",)),
        ("  ... share of the bandwidth bound", ("bandwidth_share",)),
        ("2nd query, seen image (s)", ("seen_image_query_latency_s",)),
    ]
    for n in args.clients:
        mix = " (mix A: 8 distinct images)" if n == 8 else ""
        rows += [
            (f"{n} clients{mix}: requests/s", (f"clients{n}", "requests_per_s")),
            ("  tokens/s (aggregate)", (f"clients{n}", "tokens_per_s")),
            ("  mean latency (s)", (f"clients{n}", "latency_mean_s")),
            ("  decode tokens/s per request", (f"clients{n}", "per_request_decode_tokens_per_s")),
        ]
    if not args.no_mix_b:
        rows += [
            ("mix B (8 clients x 4 q, 2 images): req/s", ("mix_b", "requests_per_s")),
            ("  tokens/s (aggregate)", ("mix_b", "tokens_per_s")),
            ("  mean latency (s)", ("mix_b", "latency_mean_s")),
            ("  wall (s)", ("mix_b", "wall_s")),
        ]
    rows += [("peak RSS of the server (MiB)", ("peak_rss_mb",))]

    def get(r: dict[str, Any], path: tuple[str, ...]) -> float:
        for key in path:
            r = r[key]
        return float(r)  # type: ignore[arg-type]

    header = f"{'':44s}" + "".join(f"{r['engine']:>16s}" for r in results)
    header += "".join(f"{r['engine'] + '/' + results[0]['engine']:>24s}" for r in results[1:])
    print(header)
    for title, path in rows:
        vals = [get(r, path) for r in results]
        line = f"{title:44s}" + "".join(f"{v:>16.3f}" for v in vals)
        line += "".join(f"{v / vals[0]:>24.2f}" if vals[0] else f"{'-':>24s}" for v in vals[1:])
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gbs": bandwidth, "results": results}, indent=1))


if __name__ == "__main__":
    main()
