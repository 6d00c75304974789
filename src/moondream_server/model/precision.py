"""Which number format and which matrix kernel each phase of the model runs with on this machine.

Two kinds of work: the vision encoder and every prefill (an image's 730 positions, a prompt)
multiply many rows by each weight and are bound by arithmetic; a decode step multiplies one row
by every text weight and is bound by how fast the weights stream from memory.

* On a CPU with native bf16 dot products (AVX512-BF16, AMX) everything is held and computed in
  bf16, as the reference does: oneDNN's bf16 GEMMs are the fastest many-row kernels there. One
  row is different: oneDNN's bf16 path streams the weights at ~13-20 GB/s, PyTorch's own
  vectorised bf16 matrix-vector kernel (reached by switching oneDNN off for that call) at the
  memory's speed, as fast as fbgemm's fp16 kernel, from the same single copy of the weights.
  At load time both are timed on the model's own weights (a few ms); PyTorch's kernel is kept
  unless oneDNN's is clearly faster (``ONEDNN_MARGIN``): on a busy machine the timings are noisy,
  and the quiet measurements on AVX512-BF16 (Zen 4) favour PyTorch's kernel 2.4x.
* Without native bf16 (AVX2 only, e.g. Zen 3) bf16 arithmetic is emulated and ~8x slower, so
  compute is float32 on the checkpoint's 16-bit weights (exact for the official bf16 one),
  packed as float16 for fbgemm (half the bytes per decode step) on background threads after
  load, and widened to float32 on each call until then (``layers.Fp16Linear``,
  ``background_packing``).
* ``quantize="int8"`` holds linear weights as int8 with one scale per output channel (see
  ``layers.Int8Linear``). Where the CPU has int8 dot products (VNNI, AMX) the vision encoder
  also computes in int8 (``layers.Int8ComputeLinear``), and so do prompt and image prefills
  (``torch._int_mm``, one activation scale per token); elsewhere those weights are widened to
  the compute dtype for each call.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8),
    which make oneDNN's int8 GEMM about twice as fast as its bf16 one; without them it is not."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


# oneDNN keeps one-row products only when this much faster than PyTorch's kernel (see above).
ONEDNN_MARGIN = 1.25


@dataclass(frozen=True)
class Precision:
    """What ``load`` chose, for /health and the start-up log."""

    compute: str  # dtype of activations and arithmetic: vision, prefill, decode
    weights: str  # how linear weights are held
    decode: str  # the kernel that multiplies one row by a weight (decode steps)
    reason: str

    def __str__(self) -> str:
        return f"compute {self.compute}, weights {self.weights}, decode via {self.decode} ({self.reason})"


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """Route matrix products to PyTorch's own kernels for the duration (the flag is process-wide;
    the model runs on one thread)."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


class RowLinear(nn.Linear):
    """``nn.Linear`` whose one-row products run on PyTorch's matrix-vector kernel, not oneDNN.

    Layers are switched to this class in place (same parameters) by ``use_native_gemv``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.device.type == "cpu":
            with onednn_off():
                return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_native_gemv(modules: list[nn.Module]) -> int:
    """Switch every plain ``nn.Linear`` under `modules` to ``RowLinear``; returns how many."""
    count = 0
    for root in modules:
        for m in root.modules():
            if type(m) is nn.Linear:
                m.__class__ = RowLinear
                count += 1
    return count


def time_one_row(weights: list[torch.Tensor], reps: int = 7) -> tuple[float, float]:
    """Fastest seconds to multiply one row by all of `weights`: (oneDNN, PyTorch's own kernel).

    The two are alternated and the best of `reps` kept, the run least disturbed by neighbours;
    `weights` should together be larger than the CPU's last-level cache, as a decode step's are.
    """
    rows = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    onednn: list[float] = []
    native: list[float] = []
    with torch.inference_mode():
        for i in range(reps + 1):
            for use_native, out in ((False, onednn), (True, native)):
                with onednn_off() if use_native else contextlib.nullcontext():
                    t = time.perf_counter()
                    for w in weights:
                        F.linear(rows[w.shape[1]], w)
                    if i:  # the first round warms both paths up
                        out.append(time.perf_counter() - t)
    return min(onednn), min(native)
