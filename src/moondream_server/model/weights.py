"""Reading the official model.safetensors into our modules.

Tensors go straight from the file into the target dtype and device, one at a time, onto a
model built on the meta device. Linear layers that will be repacked anyway (float16 storage on
the CPU) are handed to the packer as soon as their weight and bias are read, in the file's dtype,
so neither a float32 copy nor the whole file's worth of unpacked weights ever exists at once.
Tensors are views of a private memory map of the file, not copies: a weight kept in the
file's dtype (bf16 for the official checkpoint) costs no allocation, no zeroing and no copy,
only mapping the file's pages, which the OS has usually cached already. Each tensor's pages
are mapped when it is read, so loading ends with every kept weight resident. A tensor that is
converted or packed into memory of its own is let go of at once (its pages leave this process;
the mapping would otherwise keep the whole file resident beside the packed model). The file
must not be truncated or rewritten in place while the model is loaded: the kept weights are its
pages (a Hub download writes a new file and renames it, which is safe).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterator
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


# madvise(MADV_POPULATE_READ), Linux 5.14+: map a range's pages now (reading them in from disk
# if they are not cached), without faulting them in one by one on first use.
_MADV_POPULATE_READ = 22


class TensorReader:
    """Tensors of a safetensors file by name, as views of one private memory map of the file.

    The format: an 8-byte little-endian header size, a JSON header mapping names to dtype, shape
    and byte offsets, then the data. ``safe_open`` has already validated the header by the time
    this runs; a file that ends early still fails here with ``ModelLoadError``. The map is
    private (copy on write): writing to a returned tensor never changes the file. It lives as
    long as any tensor read from it, whether or not ``close`` was called.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:  # read before safe_open has looked at the file (``load`` opens it first)
                (size,) = struct.unpack("<Q", f.read(8))
                if size > os.fstat(f.fileno()).st_size - 8:
                    raise ValueError(f"a header of {size} bytes runs past the end of the file")
                self._header: dict[str, Any] = json.loads(f.read(size))
                if not isinstance(self._header, dict):
                    raise ValueError("the header is not a JSON object")
            except (struct.error, ValueError) as e:
                raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e
            self._base = 8 + size
            try:
                self._map: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot map {path}: {e}") from e
        self._size = len(self._map)
        self._populate = sys.platform == "linux"
        # ``forget`` works after ``close``: layers packed later let go of their pages through it.
        self._pages = self._map
        first_byte = torch.frombuffer(self._map, dtype=torch.uint8, count=1) if self._size else None
        self._address = 0 if first_byte is None else first_byte.data_ptr()

    def _span(self, key: str) -> tuple[int, int]:
        begin, end = self._header[key]["data_offsets"]
        start, stop = self._base + begin, self._base + end
        if stop > self._size:
            raise ModelLoadError(f"{self.path} is truncated (tensor {key} ends past the end of the file)")
        return start, stop

    def read(self, key: str) -> torch.Tensor:
        info = self._header[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, stop = self._span(key)
        shape = tuple(info["shape"])
        if stop == start:
            return torch.empty(shape, dtype=dtype)
        assert self._map is not None, "read after close"
        if self._populate:
            page = start - start % mmap.PAGESIZE
            try:
                self._map.madvise(_MADV_POPULATE_READ, page, stop - page)
            except OSError:  # an older kernel: the pages fault in on first use instead
                self._populate = False
        count = (stop - start) // dtype.itemsize
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=start).reshape(shape)

    def release(self, key: str) -> None:
        """Drop the pages that hold only `key`'s data from this process: it was copied elsewhere.

        A tensor of `key` that is used again afterwards maps its pages afresh from the file: that
        costs time, not correctness, unless it was written to (the write would be lost).
        """
        if self._map is not None:
            self._drop(*self._span(key))

    def forget(self, tensor: torch.Tensor) -> None:
        """``release`` for a tensor read from this map (by its memory, not its name; also after
        ``close``); a no-op for a tensor that lies elsewhere, such as a converted copy."""
        start = tensor.data_ptr() - self._address
        stop = start + tensor.numel() * tensor.element_size()
        if self._size and tensor.is_contiguous() and 0 <= start < stop <= self._size:
            self._drop(start, stop)

    def _drop(self, start: int, stop: int) -> None:
        """Drop the whole pages inside [start, stop): a page shared with a neighbour stays."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = stop - stop % mmap.PAGESIZE
        if last > first:
            self._pages.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Stop reading; the tensors already read stay valid (they keep the map alive)."""
        self._map = None


# (layer name, weight, bias in the file's dtype) -> a module to stand in for that nn.Linear, or
# None to keep it.
LinearPacker = Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module | None]


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


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@contextlib.contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to `count` for the block.

    The loader packs layers on threads of its own; each op inside also spreading over every
    core only makes the threads wait for each other (quantizing: 0.86-1.1 ns per weight with
    both levels against 0.63 with one, Zen 4, two cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_and_load(
    path: Path,
    config: MoondreamConfig,
    device: torch.device,
    dtype: torch.dtype,
    pack_linear: LinearPacker | None = None,
    pack_threads: int = 1,
    reader: TensorReader | None = None,
) -> MoondreamNet:
    """Build the network and fill it from `path`.

    With ``pack_linear``, every ``nn.Linear`` is offered to it once its tensors are read (in the
    file's dtype); a module it returns replaces the layer, None keeps the layer in `dtype`.
    Packing runs on ``pack_threads`` threads (fbgemm packs on one thread and releases the GIL),
    with a few layers in flight at most, so memory stays near the packed model's own size.
    `reader`, an open ``TensorReader`` of `path`, is used if given (and left to the caller);
    otherwise one is opened and closed here.
    """
    with torch.device("meta"):
        net = MoondreamNet(config)
    linears = {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)} if pack_linear else {}
    stored = _stored_names(path, {name: tuple(p.shape) for name, p in net.state_dict().items()})
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # a linear layer's tensors read so far
    in_flight: deque[tuple[str, dict[str, torch.Tensor], Future[nn.Module | None]]] = deque()

    source = TensorReader(path) if reader is None else reader

    def keep(name: str, tensor: torch.Tensor) -> None:
        """`tensor` as the parameter or buffer `name`; the file's pages go if it was copied."""
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
        if not _same_memory(state[name], tensor):
            source.release(stored[name])

    def settle(layer: str, tensors: dict[str, torch.Tensor], future: Future[nn.Module | None]) -> None:
        module = future.result()
        if module is None:  # the packer declined: an ordinary layer in `dtype`
            for part, tensor in tensors.items():
                keep(f"{layer}.{part}", tensor)
            return
        parent, _, child = layer.rpartition(".")
        setattr(net.get_submodule(parent), child, module)
        held = [*module.parameters(), *module.buffers()]
        for part, tensor in tensors.items():
            if not any(_same_memory(tensor, t) for t in held):
                source.release(stored[f"{layer}.{part}"])

    try:
        single = _intra_op_threads(1) if pack_linear else contextlib.nullcontext()
        with ThreadPoolExecutor(max(1, pack_threads)) as pool, single:
            for name, key in stored.items():
                tensor = source.read(key)
                layer, _, part = name.rpartition(".")
                linear = linears.get(layer)
                if linear is None or pack_linear is None:
                    keep(name, tensor)
                    continue
                got = pending.setdefault(layer, {})
                got[part] = tensor
                if "weight" not in got or (linear.bias is not None and "bias" not in got):
                    continue
                del pending[layer]
                future = pool.submit(pack_linear, layer, got["weight"], got.get("bias"))
                in_flight.append((layer, got, future))
                while len(in_flight) > 2 * max(1, pack_threads):
                    settle(*in_flight.popleft())
            while in_flight:
                settle(*in_flight.popleft())
    finally:
        if reader is None:
            source.close()
    net.load_state_dict(state, assign=True)
    net.text.init_rope(device)
    return net
