"""Reading the official model.safetensors into our modules.

Tensors go straight from the file into the target dtype and device, one at a time, onto a
model built on the meta device. Linear weights that will be repacked anyway (float16 storage on
the CPU) can stay in the file's dtype until then, so no full-size float32 copy ever exists.
Tensor data is read with plain reads, not through a memory map: mapped pages count in the
process's resident memory until the map closes, which added the whole file (3.9 GB) to the
loading peak.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
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


def linear_weight_names(net: nn.Module) -> set[str]:
    """State-dict names of the weights of every ``nn.Linear`` under `net`."""
    return {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, nn.Linear)}


def build_and_load(
    path: Path,
    config: MoondreamConfig,
    device: torch.device,
    dtype: torch.dtype,
    keep_stored_dtype: Callable[[nn.Module], set[str]] | None = None,
) -> MoondreamNet:
    """Build the network and fill it from `path`.

    ``keep_stored_dtype(net)`` names tensors to leave in the file's dtype (the caller converts
    them later); everything else is converted to `dtype` on reading.
    """
    with torch.device("meta"):
        net = MoondreamNet(config)
    keep = keep_stored_dtype(net) if keep_stored_dtype is not None else set()
    expected = {name: tuple(p.shape) for name, p in net.state_dict().items()}
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
    state: dict[str, torch.Tensor] = {}
    reader = TensorReader(path)
    try:
        for name, key in stored.items():
            tensor = reader.read(key)
            target = tensor.dtype if name in keep and tensor.is_floating_point() else dtype
            state[name] = tensor.to(device=device, dtype=target).contiguous()
    finally:
        reader.close()
    net.load_state_dict(state, assign=True)
    net.text.init_rope(device)
    return net
