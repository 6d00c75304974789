"""This project against the official reference implementation, in one run, alternating.

The reference (github.com/vikhyat/moondream, ``moondream/torch``, commit 44146f1) is run from
a local copy of its source given with ``--reference`` (never part of this repository), on the
same full-size random checkpoint as ``model_bench.py`` (end-of-text disabled, so every caption
decodes exactly --tokens tokens and every detection finds exactly 4 objects). The reference's
tokenizer is read from the checkpoint folder instead of the Hub.

Every side (the reference, and one or more configurations of this project) is a worker
process that loads the model once (load time and its loading peak RSS are measured there, in a
fresh process) and then waits; the driver asks the workers for one figure at a time, in turn,
reversing the order every repetition, so a slow or busy stretch of a shared machine lands on
every side alike. Only same-run ratios mean anything on such a machine.

    # once: git --git-dir=<mirror> archive 44146f1 | tar -x -C /tmp/mdref
    .venv/bin/python benchmarks/against_reference.py --reference /tmp/mdref
    .venv/bin/python benchmarks/against_reference.py --reference /tmp/mdref \
        --side ours --side ours:quantize=int8

A side is ``reference`` or ``ours[:key=value,...]`` (keyword arguments of
``moondream_server.model.load``). Every side stays loaded for the whole run: about 4 GB each
in bf16/fp16, about 2 GB with int8 weights. Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import DEFAULT_CACHE, ensure_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("encode", "caption", "detect")


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmHWM (peak resident set so far), VmRSS (now)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """When the first one-token decode step of a call began, and how many ran."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.steps = 0

    def reset(self) -> None:
        self.first, self.steps = None, 0

    def mark(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.steps += 1


class ReferenceSide:
    def __init__(self, source: Path, model: Path) -> None:
        import torch
        from tokenizers import Tokenizer

        sys.path.insert(0, str(source))
        from moondream.torch import moondream as ref
        from moondream.torch.config import MoondreamConfig
        from moondream.torch.weights import load_weights_into_model

        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))

        class LocalTokenizer:  # the reference fetches moondream/starmie-v1 from the Hub
            @staticmethod
            def from_pretrained(*_: Any, **__: Any) -> Tokenizer:
                return tokenizer

        ref.Tokenizer = LocalTokenizer
        config = MoondreamConfig.from_dict(json.loads((model / "config.json").read_text()))
        self.model = ref.MoondreamModel(config)
        load_weights_into_model(str(model / "model.safetensors"), self.model)
        self.model.eval()
        self.clock = StepClock()
        decode_one = self.model._decode_one_tok

        def timed_decode(x: Any, *args: Any) -> Any:
            if x.shape[1] == 1:
                self.clock.mark()
            return decode_one(x, *args)

        self.model._decode_one_tok = timed_decode
        self.torch = torch

    def encode(self, image: Any) -> Any:
        return self.model.encode_image(image)

    def caption(self, image: Any, tokens: int) -> str:
        # The reference's encode_image reads settings["variant"] when given settings: encode first.
        enc = self.model.encode_image(image)
        settings = {"max_tokens": tokens, "temperature": 0.0}
        return str(self.model.caption(enc, settings=settings)["caption"])

    def detect(self, enc: Any) -> int:
        return len(self.model.detect(enc, "cat", settings={"max_objects": 4})["objects"])


class OurSide:
    def __init__(self, model: Path, options: dict[str, str]) -> None:
        from moondream_server.model import load

        self.model = load(str(model), device="cpu", **options)  # type: ignore[arg-type]
        self.clock = StepClock()

        def before_text_forward(_: Any, args: tuple[Any, ...]) -> None:
            if args[0].shape[0] == 1:  # packed input of one token: a decode step
                self.clock.mark()

        self.model.net.text.register_forward_pre_hook(before_text_forward)

    def describe(self) -> dict[str, Any]:
        info = getattr(self.model, "precision", None)
        return {"precision": str(info)} if info is not None else {}

    def encode(self, image: Any) -> Any:
        return self.model.encode_image(image)

    def caption(self, image: Any, tokens: int) -> str:
        return str(self.model.caption(image, settings={"max_tokens": tokens, "temperature": 0.0})["caption"])

    def detect(self, enc: Any) -> int:
        return len(self.model.detect(enc, "cat", settings={"max_objects": 4})["objects"])


def worker(args: argparse.Namespace) -> None:
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import numpy as np
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    kind, _, opts = args.side.partition(":")
    t = time.perf_counter()
    side: ReferenceSide | OurSide
    if kind == "reference":
        side = ReferenceSide(args.reference, args.model)
    else:
        options = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
        side = OurSide(args.model, options)
    info: dict[str, Any] = {"load_s": time.perf_counter() - t}
    if isinstance(side, OurSide) and side.model.packing is not None:
        # Layers still packing in the background: usable now, at full speed from here on. The
        # figures below are taken after it, and the peak includes it.
        side.model.wait_packed()
        info["packed_s"] = time.perf_counter() - t
    info["load_peak_rss_mb"] = _status_mb("VmHWM")
    info["rss_after_load_mb"] = _status_mb("VmRSS")
    info["threads"] = torch.get_num_threads()
    if isinstance(side, OurSide):
        info.update(side.describe())
    print("READY " + json.dumps(info), flush=True)
    if args.load_only:
        return

    w, h = map(int, args.size.split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    enc = None
    for line in sys.stdin:
        what = line.strip()
        if what == "quit":
            return
        out: dict[str, Any] = {}
        side.clock.reset()
        t = time.perf_counter()
        if what == "warmup":
            enc = side.encode(image.resize((378, 378)))
            side.detect(enc)
            side.caption(image.resize((378, 378)), 2)
            enc = None
        elif what == "encode":
            enc = side.encode(image)
        elif what == "caption":
            side.caption(image, args.tokens)
        elif what == "detect":
            if enc is None:
                enc = side.encode(image)
                side.clock.reset()
                t = time.perf_counter()
            out["objects"] = side.detect(enc)
        end = time.perf_counter()
        out["s"] = end - t
        if what == "caption" and side.clock.first is not None:
            out["ttft_s"] = side.clock.first - t
            out["decode_s_per_token"] = (end - side.clock.first) / side.clock.steps
            out["decode_steps"] = side.clock.steps
        print("DONE " + json.dumps(out), flush=True)


class Worker:
    def __init__(self, side: str, args: argparse.Namespace, load_only: bool = False) -> None:
        cmd = [sys.executable, __file__, "--worker", "--side", side, "--model", str(args.model)]
        cmd += ["--reference", str(args.reference), "--size", args.size, "--tokens", str(args.tokens)]
        cmd += ["--threads", str(args.threads)] + (["--src", args.src] if args.src else [])
        cmd += ["--load-only"] if load_only else []
        env = dict(os.environ, PYTHONPATH=str(Path(args.src or ROOT / "src").resolve()))
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._expect("READY ")

    def _expect(self, prefix: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line.removeprefix(prefix))  # type: ignore[no-any-return]
            print(f"[{self.side}] {line.rstrip()}", file=sys.stderr)
        raise SystemExit(f"worker {self.side} exited with {self.proc.wait()}")

    def ask(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._expect("DONE ")

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="folder holding the reference's moondream/")
    p.add_argument("--side", action="append", help="reference | ours[:key=value,...] (repeatable)")
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE, help="full-size checkpoint folder")
    p.add_argument("--src", help="source tree to import moondream_server from (default: this checkout)")
    p.add_argument("--size", default="640x480", help="test image WxH")
    p.add_argument("--tokens", type=int, default=32, help="tokens per caption")
    p.add_argument("--reps", type=int, default=2, help="repetitions per figure and side (median)")
    p.add_argument("--load-reps", type=int, default=1, help="extra fresh load-only processes per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--figures", default=",".join(FIGURES), help="comma list of " + ", ".join(FIGURES))
    p.add_argument("--json", type=Path, help="also write all samples here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.side = args.side[0]
        worker(args)
        return

    args.model = ensure_checkpoint(args.model)
    sides = ["reference", *(args.side or ["ours"])] if "reference" not in (args.side or []) else args.side
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in sides}
    infos: dict[str, dict[str, Any]] = {}

    def add(side: str, key: str, value: float) -> None:
        samples[side].setdefault(key, []).append(value)

    # Loading: each side in fresh processes, one after the other (the workers that stay are the
    # first of them, started in list order; the reference first, while little else is resident).
    workers: list[Worker] = []
    for s in sides:
        print(f"loading {s} ...", file=sys.stderr, flush=True)
        w = Worker(s, args)
        print(f"  {s}: {json.dumps(w.info)}", file=sys.stderr, flush=True)
        workers.append(w)
        infos[s] = w.info
        for key in ("load_s", "packed_s", "load_peak_rss_mb", "rss_after_load_mb"):
            if key in w.info:
                add(s, key, w.info[key])
    for rep in range(args.load_reps - 1):
        for s in sides if rep % 2 else reversed(sides):
            print(f"loading {s} again (load only) ...", file=sys.stderr, flush=True)
            extra = Worker(s, args, load_only=True)
            extra.proc.wait()
            print(f"  {s}: {json.dumps(extra.info)}", file=sys.stderr, flush=True)
            for key in ("load_s", "packed_s", "load_peak_rss_mb"):
                if key in extra.info:
                    add(s, key, extra.info[key])
    try:
        for w in workers if args.reps else []:
            print(f"warming up {w.side} ...", file=sys.stderr, flush=True)
            w.ask("warmup")
        figures = args.figures.split(",")
        for rep in range(args.reps):
            for fig in figures:
                order = workers if rep % 2 == 0 else workers[::-1]
                for w in order:
                    r = w.ask(fig)
                    print(f"  rep {rep} {fig:8s} {w.side:30s} {json.dumps(r)}", file=sys.stderr, flush=True)
                    add(w.side, fig + "_s", r["s"])
                    for key in ("ttft_s", "decode_s_per_token"):
                        if key in r:
                            add(w.side, key, r[key])
    finally:
        for w in workers:
            w.close()

    rows = [
        ("decode_s_per_token", "decode (s/token)"),
        ("encode_s", f"encode {args.size} (s)"),
        ("caption_s", f"fresh caption {args.size}, {args.tokens} tokens (s)"),
        ("ttft_s", "  of which before the first decode step (s)"),
        ("detect_s", "detect, 4 objects, encoded image (s)"),
        ("load_s", "load (s)"),
        ("packed_s", "  until packed in the background (s)"),
        ("load_peak_rss_mb", "loading peak RSS (MiB)"),
        ("rss_after_load_mb", "RSS after load (MiB)"),
    ]
    cpu = _cpu_name()
    print(
        f"\n{cpu}; threads {infos[sides[0]]['threads']}; "
        f"reps {args.reps} (median), load reps {args.load_reps}"
    )
    for s in sides:
        if "precision" in infos[s]:
            print(f"{s}: {infos[s]['precision']}")
    width = max(14, *(len(s) + 2 for s in sides))
    print(f"{'':46s}" + "".join(f"{s:>{width}s}" for s in sides))
    med = {s: {k: statistics.median(v) for k, v in samples[s].items()} for s in sides}
    for key, title in rows:
        if not any(key in med[s] for s in sides):
            continue
        cells = "".join(f"{med[s][key]:>{width}.3f}" if key in med[s] else f"{'-':>{width}s}" for s in sides)
        print(f"{title:46s}{cells}")
    base = sides[0]
    print(f"\nratios to {base} (same run; < 1 = faster / smaller):")
    for key, title in rows:
        base_key = "load_s" if key == "packed_s" else key  # the reference has nothing left to pack
        if base_key not in med[base] or not any(key in med[s] for s in sides):
            continue
        cells = "".join(
            f"{med[s][key] / med[base][base_key]:>{width}.2f}" if key in med[s] else f"{'-':>{width}s}"
            for s in sides
        )
        print(f"{title:46s}{cells}")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "infos": infos, "samples": samples}, indent=1))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return "unknown CPU"
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in text.splitlines()[:30]) if v
    )
    flags = fields.get("flags", "").split()
    native = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx2") if f in flags]
    return (
        f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model "
        f"{fields.get('model', '?')}; {', '.join(native)}), {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
