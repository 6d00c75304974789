"""The official reference implementation, timed on the same checkpoint and device: the baseline.

The reference (github.com/vikhyat/moondream, commit 44146f1, folder moondream/torch) is not part
of this project: fetch it and pass the folder that holds its ``moondream`` package as --ref-src.
Its tokenizer download is replaced by the checkpoint's tokenizer.json (nothing else changes).

    python3 benchmarks/reference_bench.py --ref-src /path/to/moondream-checkout --device cuda
    python3 benchmarks/reference_bench.py --ref-src ... --compile   # its torch.compile path

Prints figures (and one RESULT json line); it is not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import DEFAULT_CACHE, ensure_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-src", type=Path, required=True, help="folder holding the reference's moondream/")
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE, help="full-size checkpoint folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="640x480", help="WxH of the test images")
    p.add_argument("--tokens", type=int, default=32, help="caption length (tokens)")
    p.add_argument("--short-tokens", type=int, default=8, help="short answer length (tokens)")
    p.add_argument("--reps", type=int, default=10, help="fresh-image short answers timed (median)")
    p.add_argument("--compile", action="store_true", help="call the reference's compile() first")
    args = p.parse_args()

    import numpy as np
    import tokenizers
    import torch
    from PIL import Image

    model_dir = ensure_checkpoint(args.model)
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizers.Tokenizer.from_pretrained = staticmethod(lambda *a, **k: tokenizer)  # no network
    sys.path.insert(0, str(args.ref_src.resolve()))
    from moondream.torch.config import MoondreamConfig  # type: ignore[import-not-found]
    from moondream.torch.moondream import MoondreamModel  # type: ignore[import-not-found]
    from moondream.torch.weights import load_weights_into_model  # type: ignore[import-not-found]

    dev = torch.device(args.device)
    config = MoondreamConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    t = time.perf_counter()
    with dev:
        model = MoondreamModel(config, dtype=torch.bfloat16, setup_caches=False)
    load_weights_into_model(str(model_dir / "model.safetensors"), model)
    model = model.to(dev).eval()
    model._setup_caches()
    load_s = time.perf_counter() - t
    if args.compile:
        model.compile()

    w, h = (int(v) for v in args.size.split("x"))
    seed = [0]

    def fresh() -> Image.Image:
        seed[0] += 1
        rng = np.random.default_rng(1000 + seed[0])
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Any) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def caption(img: Image.Image, n: int) -> str:
        # encode_image first: the reference's caption() reads settings["variant"] when it encodes
        enc = model.encode_image(img)
        return str(model.caption(enc, settings={"max_tokens": n, "temperature": 0.0})["caption"])

    def short(img: Image.Image) -> str:
        enc = model.encode_image(img)
        settings = {"max_tokens": args.short_tokens, "temperature": 0.0}
        return str(model.query(enc, "Describe the colours.", settings=settings)["answer"])

    t = time.perf_counter()
    for _ in range(3):  # warm-up (and, with --compile, compilation)
        caption(fresh(), 4)
        short(fresh())
    warm_s = time.perf_counter() - t
    res: dict[str, Any] = {"torch": torch.__version__, "compile": args.compile, "load_s": load_s}
    res["warmup_s"] = warm_s
    res["encode_s"] = statistics.median(timed(lambda: model.encode_image(fresh())) for _ in range(3))
    res["caption_s"] = statistics.median(timed(lambda: caption(fresh(), args.tokens)) for _ in range(3))
    res["caption_1_token_s"] = statistics.median(timed(lambda: caption(fresh(), 1)) for _ in range(3))
    decode_s = (res["caption_s"] - res["caption_1_token_s"]) / (args.tokens - 1)
    res["decode_tokens_per_s"] = 1.0 / decode_s
    shorts = sorted(timed(lambda: short(fresh())) for _ in range(args.reps))
    res["short_answer_p50_s"] = statistics.median(shorts)
    res["short_answer_serial_req_per_s"] = len(shorts) / sum(shorts)
    if dev.type == "cuda":
        res["device"] = torch.cuda.get_device_name()
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    label = "reference (compiled)" if args.compile else "reference (eager)"
    print(f"\n{label}, {args.size}, bf16 on {res.get('device', args.device)}, torch {torch.__version__}")
    print(f"  load {load_s:.1f} s, warm-up {warm_s:.1f} s")
    print(f"  image encode (vision + prefill): {res['encode_s'] * 1000:.1f} ms")
    print(f"  caption of {args.tokens} tokens: {res['caption_s'] * 1000:.1f} ms")
    print(f"  decode: {res['decode_tokens_per_s']:.1f} tokens/s (one stream)")
    print(
        f"  short answer ({args.short_tokens} tokens, fresh image), "
        f"p50: {res['short_answer_p50_s'] * 1000:.1f} ms"
    )
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
