"""Reading the official model.safetensors into our modules.

Tensors go straight from the file into the target dtype and device, one at a time, onto a
model built on the meta device. Linear layers that will be repacked anyway (float16 storage on
the CPU) are handed to the packer as soon as their weight and bias are read, in the file's dtype,
so neither a float32 copy nor the whole file's worth of unpacked weights ever exists at once.
Tensor data is read with plain reads, not through a memory map: mapped pages count in the
process's resident memory until the map closes, which added the whole file (3.9 GB) to the
loading peak.
"""

from __future__ import annotations

import io
import json
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.hub import ModelLoadError
from moondream_server.model.net import MoondreamNet

PREFIX = "model."


_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorReader:
    """Tensors of a safetensors file by name, each read into memory of its own (no memory map).

    The format: an 8-byte little-endian header size, a JSON header mapping names to dtype, shape
    and byte offsets, then the data. ``safe_open`` has already validated the header by the time
    this runs; a file that ends early still fails here with ``ModelLoadError``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.BufferedReader = open(path, "rb")  # noqa: SIM115 (closed by close())
        (size,) = struct.unpack("<Q", self._file.read(8))
        self._header: dict[str, Any] = json.loads(self._file.read(size))
        self._base = 8 + size

    def read(self, key: str) -> torch.Tensor:
        info = self._header[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        self._file.seek(self._base + begin)
        if self._file.readinto(buf) != len(buf):
            raise ModelLoadError(f"{self.path} is truncated (tensor {key} ends past the end of the file)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()


# (weight, bias) in the file's dtype -> a module to stand in for that nn.Linear, or None to keep it.
LinearPacker = Callable[[torch.Tensor, torch.Tensor | None], nn.Module | None]


def _stored_names(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Our parameter name -> the file's key, once the file's names and shapes match `expected`."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e
    with handle as f:
        stored = {key.removeprefix(PREFIX): key for key in f.keys()}  # noqa: SIM118
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(
                    f"missing {len(missing)} tensors (e.g. {', '.join(PREFIX + m for m in missing[:3])})"
                )
            if unexpected:
                examples = ", ".join(stored[u] for u in unexpected[:3])
                parts.append(f"unexpected {len(unexpected)} tensors (e.g. {examples})")
            raise ModelLoadError(f"{path} does not match the Moondream2 layout: " + "; ".join(parts))
        for name, key in stored.items():
            shape = tuple(f.get_slice(key).get_shape())
            if shape != expected[name]:
                raise ModelLoadError(
                    f"{path}: tensor {key} has shape {list(shape)}, the config expects {list(expected[name])}"
                    " (is config.json the one that belongs to these weights?)"
                )
    return stored


def build_and_load(
    path: Path,
    config: MoondreamConfig,
    device: torch.device,
    dtype: torch.dtype,
    pack_linear: LinearPacker | None = None,
    pack_threads: int = 1,
) -> MoondreamNet:
    """Build the network and fill it from `path`.

    With ``pack_linear``, every ``nn.Linear`` is offered to it once its tensors are read (in the
    file's dtype); a module it returns replaces the layer, None keeps the layer in `dtype`.
    Packing runs on ``pack_threads`` threads (fbgemm packs on one thread and releases the GIL),
    with a few layers in flight at most, so memory stays near the packed model's own size.
    """
    with torch.device("meta"):
        net = MoondreamNet(config)
    linears = {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)} if pack_linear else {}
    stored = _stored_names(path, {name: tuple(p.shape) for name, p in net.state_dict().items()})
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # a linear layer's tensors read so far
    in_flight: deque[tuple[str, dict[str, torch.Tensor], Future[nn.Module | None]]] = deque()

    def settle(layer: str, tensors: dict[str, torch.Tensor], future: Future[nn.Module | None]) -> None:
        module = future.result()
        if module is None:  # the packer declined: an ordinary layer in `dtype`
            for part, tensor in tensors.items():
                state[f"{layer}.{part}"] = tensor.to(device=device, dtype=dtype).contiguous()
        else:
            parent, _, child = layer.rpartition(".")
            setattr(net.get_submodule(parent), child, module)

    reader = TensorReader(path)
    try:
        with ThreadPoolExecutor(max(1, pack_threads)) as pool:
            for name, key in stored.items():
                tensor = reader.read(key)
                layer, _, part = name.rpartition(".")
                linear = linears.get(layer)
                if linear is None or pack_linear is None:
                    state[name] = tensor.to(device=device, dtype=dtype).contiguous()
                    continue
                got = pending.setdefault(layer, {})
                got[part] = tensor
                if "weight" not in got or (linear.bias is not None and "bias" not in got):
                    continue
                del pending[layer]
                future = pool.submit(pack_linear, got["weight"], got.get("bias"))
                in_flight.append((layer, got, future))
                while len(in_flight) > 2 * max(1, pack_threads):
                    settle(*in_flight.popleft())
            while in_flight:
                settle(*in_flight.popleft())
    finally:
        reader.close()
    net.load_state_dict(state, assign=True)
    net.text.init_rope(device)
    return net
