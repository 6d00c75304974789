"""Reading safetensors files: the plain-read tensor reader against the safetensors library."""

from __future__ import annotations

import json
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moondream_server.model import ModelLoadError, MoondreamConfig
from moondream_server.model.layers import Fp16Linear, pack_fp16
from moondream_server.model.weights import TensorReader, build_and_load
from tests.model.support import mapped_kib


def test_reader_matches_the_safetensors_library(tmp_path: Path, random_folder: Path) -> None:
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "f32": torch.randn(2, 2, 2),
        "i64": torch.arange(6).view(2, 3),
        "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    for file in (path, random_folder / "model.safetensors"):
        expected = load_file(str(file))
        reader = TensorReader(file)
        try:
            for key, want in expected.items():
                got = reader.read(key)
                assert got.dtype == want.dtype and got.shape == want.shape, key
                assert torch.equal(got, want), key
        finally:
            reader.close()


def test_a_file_that_ends_early_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(1000)}, str(path))
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + size])
    last = max(("a", "b"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-100])  # cuts into the last tensor's data
    reader = TensorReader(path)
    try:
        with pytest.raises(ModelLoadError, match="truncated"):
            reader.read(last)
    finally:
        reader.close()


def test_linear_layers_are_packed_while_the_file_is_read(
    monkeypatch: pytest.MonkeyPatch, random_folder: Path, tiny_config: MoondreamConfig
) -> None:
    """Each layer is packed as soon as its tensors are in, and the loader lets go of them once
    packed: holding every unpacked weight until the end made the loading peak 1.5x the model."""
    events: list[str] = []
    read = TensorReader.read

    def logged_read(self: TensorReader, key: str) -> torch.Tensor:
        events.append("read")
        return read(self, key)

    handed: list[weakref.ref[torch.Tensor]] = []
    most_alive = 0  # earlier layers' unpacked weights still referenced when a layer is packed

    def packer(layer: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Fp16Linear | None:
        nonlocal most_alive
        events.append("pack")
        most_alive = max(most_alive, sum(ref() is not None for ref in handed))
        handed.append(weakref.ref(weight))
        return pack_fp16(weight, bias)

    monkeypatch.setattr(TensorReader, "read", logged_read)
    path = random_folder / "model.safetensors"
    net = build_and_load(path, tiny_config, torch.device("cpu"), torch.float32, packer, pack_threads=1)
    assert not any(isinstance(m, torch.nn.Linear) for m in net.modules())
    assert sum(isinstance(m, Fp16Linear) for m in net.modules()) == events.count("pack") > 10
    assert events.index("pack") < len(events) // 4  # packing starts early, not after the last read
    assert most_alive <= 3  # two layers queued behind the one being packed, at most


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_reader_maps_the_file_and_releases_what_was_copied(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    big = torch.arange(2**20, dtype=torch.float32)  # 4 MiB
    save_file({"big": big, "small": torch.ones(3)}, str(path))
    written = TensorReader(path).read("big")
    written[0] = -1.0  # the map is private: the file keeps its data
    assert torch.equal(load_file(str(path))["big"], big)
    del written
    reader = TensorReader(path)
    got = reader.read("big")
    assert mapped_kib(path) >= 4096  # mapped in when read, not on first use
    reader.release("big")
    assert mapped_kib(path) < 64  # only pages shared with a neighbour may stay
    reader.close()
    assert torch.equal(got, big)  # still readable after release and close: mapped again on use
    assert torch.equal(TensorReader(path).read("small"), torch.ones(3))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_packed_layers_leave_no_file_pages_behind(
    tmp_path: Path, random_folder: Path, tiny_config: MoondreamConfig
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes((random_folder / "model.safetensors").read_bytes())
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    net = build_and_load(path, tiny_config, cpu, bf16, lambda _, w, b: pack_fp16(w, b), pack_threads=2)
    packed = [m for m in net.modules() if isinstance(m, Fp16Linear)]
    assert packed
    kept = sum(p.numel() * p.element_size() for p in net.parameters())  # the unpacked tensors
    linear_bytes = sum(m.in_features * m.out_features * 2 for m in packed)
    assert linear_bytes > kept  # the bound below would catch keeping the packed weights
    pages = 2 * len(list(net.parameters())) * 4  # KiB: a page at each end of a tensor
    assert mapped_kib(path) <= kept // 1024 + pages


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_layers_left_to_pack_later_keep_their_file_pages(
    tmp_path: Path, random_folder: Path, tiny_config: MoondreamConfig
) -> None:
    """An unpacked ``Fp16Linear`` multiplies by the file's pages: the loader must not drop them
    (they would be faulted in again from the file on first use)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes((random_folder / "model.safetensors").read_bytes())
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    packer = lambda _, w, b: pack_fp16(w, b, pack=False)  # noqa: E731
    net = build_and_load(path, tiny_config, cpu, bf16, packer, pack_threads=2)
    layers = [m for m in net.modules() if isinstance(m, Fp16Linear)]
    assert layers and not any(m.packed for m in layers)
    linear_kib = sum(m.in_features * m.out_features * 2 for m in layers) // 1024
    pages = 2 * len(layers) * 4  # KiB: a page at each end of a weight may be shared, and dropped
    assert mapped_kib(path) >= linear_kib - pages


def test_packing_runs_with_one_intra_op_thread_and_restores_the_count(
    random_folder: Path, tiny_config: MoondreamConfig
) -> None:
    """The loader's own threads pack; ops inside them must not also fan out over every core."""
    seen: set[int] = set()

    def packer(layer: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Fp16Linear | None:
        seen.add(torch.get_num_threads())
        if layer.endswith("lm_head"):
            raise RuntimeError("a packer that fails")
        return pack_fp16(weight, bias)

    original = torch.get_num_threads()
    torch.set_num_threads(2)  # more than one, whatever this machine has, so the test can fail
    try:
        path = random_folder / "model.safetensors"
        with pytest.raises(RuntimeError, match="a packer that fails"):
            build_and_load(path, tiny_config, torch.device("cpu"), torch.float32, packer, pack_threads=2)
        assert seen == {1}
        assert torch.get_num_threads() == 2  # restored although packing failed
    finally:
        torch.set_num_threads(original)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_reader_forgets_a_tensor_by_its_memory_even_after_close(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    big = torch.arange(2**20, dtype=torch.float32)  # 4 MiB
    save_file({"big": big}, str(path))
    reader = TensorReader(path)
    got = reader.read("big")
    reader.close()
    elsewhere = big.clone()
    reader.forget(elsewhere)  # not in the map: left alone
    assert torch.equal(elsewhere, big)
    assert mapped_kib(path) >= 4096
    reader.forget(got)
    assert mapped_kib(path) < 64
    assert torch.equal(got, big)  # mapped again from the file on use


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01garbage",  # shorter than the size field
        struct.pack("<Q", 2**40) + b"{}",  # a header size past the end of the file
        struct.pack("<Q", 2) + b"[]",  # JSON, but not an object
        struct.pack("<Q", 3) + b"{x}",  # not JSON
    ],
)
def test_reader_refuses_a_damaged_header_with_a_load_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        TensorReader(path)
