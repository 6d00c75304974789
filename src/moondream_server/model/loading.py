"""``load()``: from a folder or the Hub to a ready ``Moondream``."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from moondream_server.model.background_packing import BackgroundPacking
from moondream_server.model.config import MoondreamConfig
from moondream_server.model.hub import DEFAULT_MODEL, ModelLoadError, resolve
from moondream_server.model.layers import (
    Fp16Linear,
    Int8ComputeLinear,
    fused_gelu_works,
    int8_compute_works,
    int8_rows_work,
    pack_fp16,
    pack_int8,
    use_fused_gelu,
    use_int8_compute,
)
from moondream_server.model.moondream import Moondream
from moondream_server.model.net import MoondreamNet
from moondream_server.model.precision import (
    ONEDNN_MARGIN,
    Precision,
    cpu_has_int8_dot,
    cpu_has_native_bf16,
    time_one_row,
    use_native_gemv,
)
from moondream_server.model.tiling import Resampler
from moondream_server.model.weights import LinearPacker, TensorReader, build_and_load

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# Timed rounds per kernel at load (after one warm-up round): each round reads one text layer's
# weights (100 MB in bf16) twice; three keep the best-of margin at a quarter second of loading.
CALIBRATION_REPS = 3

CPU_WEIGHTS = ("auto", "float32", "float16")
QUANTIZE = ("none", "int8")


def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Loading frees every unpacked tensor between allocations of packed ones; glibc keeps those
    holes in the heap, which left ~0.7 GB more resident after loading than the model needs.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def load(
    source: str | os.PathLike[str] = DEFAULT_MODEL,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: str | None = None,
    resampler: Resampler | None = None,
    cpu_weights: str = "auto",
    quantize: str = "none",
) -> Moondream:
    """Load Moondream2 from a local folder or a Hub repo (default: vikhyatk/moondream2 @ 2025-06-21).

    A folder holds ``model.safetensors``, optionally ``config.json`` (config_md2.json shape) and
    ``tokenizer.json``. Device auto = CUDA if present; dtype auto = bf16 on CUDA and on CPUs with
    native bf16, else float32.

    ``cpu_weights`` (float32 on the CPU only) picks how linear weights are held: ``"float32"``
    keeps plain ``nn.Linear``; ``"auto"`` (default) stores them as float16 wherever that is
    lossless (``layers.fp16_lossless``; true of bf16 checkpoints such as the official one), which
    halves the bytes every decode step reads and avoids MKL's slow path for few-row GEMMs, with
    float32 arithmetic throughout (the weights are then no longer ``nn.Parameter``s); ``"float16"``
    rounds every weight to float16 (lossy for float32 checkpoints).

    On a CPU with native bf16 (dtype auto -> bf16), one-row products (decode steps) run on
    whichever of oneDNN and PyTorch's own matrix-vector kernel a short measurement at load
    finds faster (``precision.py``). ``quantize="int8"`` (CPU only) holds every linear weight as
    int8 with per-channel scales instead. ``Moondream.precision`` says what was chosen.
    """
    files = resolve(source, revision, tokenizer)
    config = MoondreamConfig.from_json(files.config) if files.config else MoondreamConfig()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if cpu_weights not in CPU_WEIGHTS:
        raise ValueError(f"unknown cpu_weights {cpu_weights!r}; use one of {', '.join(CPU_WEIGHTS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    if quantize == "int8" and dev.type != "cpu":
        raise ValueError("quantize=int8 is implemented for the CPU only")
    pack = dev.type == "cpu" and dt == torch.float32 and cpu_weights != "float32" and _has_fbgemm()
    # Each linear layer is converted as it is read (int8: quantized, so the unpacked weights never
    # pile up; float16: wrapped around the file's pages, packed for fbgemm after loading).
    packer: LinearPacker | None = None
    int8_dot = quantize == "int8" and cpu_has_int8_dot()
    int8_vision = int8_dot and int8_compute_works(dt)
    int8_rows = int8_dot and int8_rows_work()
    if quantize == "int8":
        packer = functools.partial(_pack_int8, compute_dtype=dt, int8_vision=int8_vision, int8_rows=int8_rows)
    elif pack:
        exact_only = cpu_weights == "auto"
        packer = lambda _, weight, bias: pack_fp16(weight, bias, exact_only=exact_only, pack=False)  # noqa: E731
    reader = TensorReader(files.weights)
    threads = torch.get_num_threads()
    try:
        net = build_and_load(files.weights, config, dev, dt, packer, pack_threads=threads, reader=reader)
    finally:
        reader.close()
    precision = _choose_kernels(net, dev, dt, quantize, pack, int8_vision, int8_rows)
    if dev.type == "cpu":
        release_free_heap()
    packing = _pack_in_background(net, reader, threads) if pack else None
    try:
        tok = Tokenizer.from_file(str(Path(files.tokenizer)))
    except Exception as e:  # the tokenizers library raises a bare Exception subclass
        raise ModelLoadError(f"cannot read tokenizer {files.tokenizer}: {e}") from e
    model = Moondream(net, tok, config, model_id=files.model_id, revision=files.revision, resampler=resampler)
    model.precision = precision
    model.packing = packing
    return model


def _pack_in_background(net: MoondreamNet, reader: TensorReader, threads: int) -> BackgroundPacking:
    """Start packing the float16 layers, the text and region models' first: their few-row
    products (decode steps) gain the most. The vision encoder's thousands of rows lose only
    ~6 % to widening its weights on each call until then (33.2 against 35.3 s per 640x480
    image, Zen 4, float32)."""
    named = [(name, m) for name, m in net.named_modules() if isinstance(m, Fp16Linear)]
    layers = [m for name, m in named if not name.startswith("vision.")]
    layers += [m for name, m in named if name.startswith("vision.")]
    return BackgroundPacking(layers, forget=reader.forget, finished=release_free_heap, threads=threads)


def _pack_int8(
    layer: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    compute_dtype: torch.dtype,
    int8_vision: bool,
    int8_rows: bool,
) -> nn.Module:
    """An int8 layer; in the vision encoder, repacked for int8 arithmetic where that was chosen;
    elsewhere multiplying many-row inputs in int8 where ``int8_rows`` was chosen.

    Repacking here, on the loader's threads beside the other layers' quantization, instead of
    after loading, spreads oneDNN's repacking (~5 ns per weight) over every core."""
    if int8_vision and layer.startswith("vision."):
        return Int8ComputeLinear(pack_int8(weight, bias, compute_dtype=compute_dtype))
    return pack_int8(weight, bias, compute_dtype=compute_dtype, int8_rows=int8_rows)


def _choose_kernels(
    net: MoondreamNet,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str,
    fp16_packed: bool,
    int8_vision: bool,
    int8_rows: bool,
) -> Precision:
    """Settle the one-row (decode) kernel, measuring where the CPU's features do not decide it."""
    name = str(dtype).removeprefix("torch.")
    if device.type != "cpu":
        return Precision(name, name, "cuBLAS", "GPU")
    if quantize == "int8":
        vision = f"vision encoder in {name} on widened weights"
        if int8_vision:
            use_int8_compute([net.vision])  # done while loading; this catches any layer left
            use_fused_gelu([net.vision])
            vision = "vision encoder in int8 (oneDNN, VNNI)"
        prefill = f"prefill in {name} on widened weights"
        decode = "_weight_int8pack_mm"
        if int8_rows:
            prefill = "prefill in int8 (one scale per token)"
            decode = "int8 x int8 (_int_mm) for one row, _weight_int8pack_mm for 2-16"
        why = f"quantize=int8; {vision}; {prefill}"
        return Precision(name, "int8 per channel", decode, why)
    if fp16_packed:
        return Precision(
            name,
            "16-bit where float16 holds them exactly",
            "fbgemm fp16 (packed in the background after load; weights widened per call until then)",
            "float32 compute, fp16 weights",
        )
    if dtype != torch.bfloat16:
        return Precision(name, name, "MKL/oneDNN", f"dtype {name}")
    if fused_gelu_works(dtype):
        use_fused_gelu([net.vision, net.text, net.region])
    # Every weight a decode step reads in one layer of the text model: larger than the cache.
    block = net.text.blocks[0]
    weights = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
    onednn_s, native_s = time_one_row(weights, reps=CALIBRATION_REPS)
    why = f"one row: oneDNN {onednn_s * 1e3:.1f} ms, own kernel {native_s * 1e3:.1f} ms per text layer"
    if native_s <= onednn_s * ONEDNN_MARGIN:
        use_native_gemv([net.text, net.region])
        return Precision(name, name, "PyTorch's bf16 matrix-vector kernel", why)
    return Precision(name, name, "oneDNN", why)
