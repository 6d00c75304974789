"""Quick golden check (a throwaway, not the test suite): all task outputs on the tiny golden sets.

In float32 every output must match (46/46, 46/46, 19/19), with the default (auto) CPU weights
and with --cpu-weights float32. With --dtype bfloat16 (or a lossy weight format) it reports the
drift instead: how many greedy outputs still match, and the max abs difference of the first-step
caption logits against the golden float32 logits.

    .venv/bin/python benchmarks/golden_check.py
    .venv/bin/python benchmarks/golden_check.py --dtype bfloat16
    .venv/bin/python benchmarks/golden_check.py --cpu-weights float32
    .venv/bin/python benchmarks/golden_check.py --dtype auto --quantize int8
    python3 benchmarks/golden_check.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moondream_server.model import load  # noqa: E402
from moondream_server.model.text import SeqSlice  # noqa: E402

SETS = [
    ("tests/fixtures/moondream2-tiny", "", "pil"),
    ("tests/fixtures/moondream2-tiny", "vips/", "vips"),
    ("tests/fixtures/moondream2-tiny-mh", "", "pil"),
]


def run(folder: str, sub: str, resampler: str, args: argparse.Namespace) -> bool:
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "resampler": resampler}
    if args.cpu_weights:
        kwargs["cpu_weights"] = args.cpu_weights
    m = load(str(ROOT / folder), quantize=args.quantize, **kwargs)
    print(f"{folder}: {m.precision}")
    base = ROOT / folder / sub
    expected = json.loads((base / "expected.json").read_text())
    golden = load_file(str(base / "expected.safetensors"))
    s = {"max_tokens": 12, "temperature": 0.0}
    bad = n = 0
    logit_diff = 0.0
    for name, im in expected["images"].items():
        enc = m.encode_image(Image.open(ROOT / folder / im["file"]))
        key = f"{name}_caption_normal_logits0"
        if key in golden:
            ids = list(m.config.tokenizer.templates["caption"]["normal"])
            cache, prefix = m.start_cache(enc)
            logits = m.step(m.ctx.embed(ids), SeqSlice(cache, len(ids), prefix=prefix)).logits
            logit_diff = max(logit_diff, (logits.float().cpu() - golden[key]).abs().max().item())
        t = im["tasks"]
        got = {
            "caption_short": m.caption(enc, "short", settings=s),
            "caption_normal": m.caption(enc, "normal", settings=s),
            "caption_long": m.caption(enc, "long", settings=s),
            "query": m.query(enc, "What is in this image?", settings=s),
            "query_spatial_point": m.query(
                enc, "What is in this image?", spatial_refs=[[0.25, 0.5]], settings=s
            ),
            "query_spatial_box": m.query(
                enc, "What is in this image?", spatial_refs=[[0.1, 0.2, 0.6, 0.7]], settings=s
            ),
            "detect": m.detect(enc, "cat", settings={"max_objects": 4}),
            "point": m.point(enc, "cat", settings={"max_objects": 4}),
            "query_reasoning": m.query(enc, "What is in this image?", reasoning=True, settings=s),
        }
        for k, v in got.items():
            n += 1
            exp = t[k]["result"]
            if json.loads(json.dumps(v)) != exp:
                bad += 1
                print("MISMATCH", name, k, "\n got", v, "\n exp", exp)
    q = m.query(None, "What is in this image?", settings=s)
    n += 1
    if q != expected["text_only"]["q0"]["result"]:
        bad += 1
        print("MISMATCH text-only", q, expected["text_only"]["q0"]["result"])
    print(f"{folder} {sub} {n - bad}/{n} ok; first-step logits max abs diff {logit_diff:.3g}", flush=True)
    return bad == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu-weights", default=None, help="auto (default), float32 or float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quantize", default="none", help="none or int8")
    p.add_argument("--no-vips", action="store_true", help="skip the libvips set (no pyvips installed)")
    args = p.parse_args()
    sets = [s for s in SETS if not (args.no_vips and s[2] == "vips")]
    ok = [run(folder, sub, res, args) for folder, sub, res in sets]
    raise SystemExit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
