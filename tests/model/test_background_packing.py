"""Packing float16 layers on background threads after load."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from moondream_server.model import Moondream
from moondream_server.model.background_packing import NICENESS, BackgroundPacking, _lower_priority
from moondream_server.model.layers import Fp16Linear


def _layers(count: int) -> list[Fp16Linear]:
    g = torch.Generator().manual_seed(0)
    return [Fp16Linear(torch.randn(32, 16, generator=g).bfloat16(), pack=False) for _ in range(count)]


def test_every_layer_is_packed_and_its_weight_handed_back_once() -> None:
    layers = _layers(7)
    weights = {layer.weight16.data_ptr() for layer in layers if layer.weight16 is not None}
    forgotten: list[int] = []
    finished = threading.Event()
    packing = BackgroundPacking(
        layers, forget=lambda t: forgotten.append(t.data_ptr()), finished=finished.set, threads=3
    )
    assert packing.wait(timeout=30)
    assert packing.done and finished.is_set()
    assert all(layer.packed for layer in layers) and packing.packed == packing.total == 7
    assert sorted(forgotten) == sorted(weights)
    assert packing.seconds is not None and packing.seconds >= 0


def test_a_layer_that_fails_to_pack_stays_usable_and_the_rest_are_packed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    layers = _layers(4)
    broken = layers[1]
    original = Fp16Linear.pack

    def pack(self: Fp16Linear, scratch: torch.Tensor | None = None) -> torch.Tensor | None:
        if self is broken:
            raise RuntimeError("no memory for the packed copy")
        return original(self, scratch)

    monkeypatch.setattr(Fp16Linear, "pack", pack)
    with caplog.at_level(logging.INFO, logger="moondream_server.model.background_packing"):
        packing = BackgroundPacking(layers, threads=2)
        assert packing.wait(timeout=30)
    assert [layer.packed for layer in layers] == [True, False, True, True]
    assert "stays unpacked" in caplog.text and "32x16" in caplog.text
    assert "3 of 4 fp16 layers packed" in caplog.text
    assert broken(torch.ones(1, 16)).shape == (1, 32)


def test_nothing_to_pack_is_done_at_once() -> None:
    finished = threading.Event()
    packing = BackgroundPacking([], finished=finished.set, threads=2)
    assert packing.done and finished.is_set() and packing.total == 0


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are a Linux feature")
def test_packing_threads_give_way_to_the_rest_of_the_process() -> None:
    seen: dict[str, int] = {}

    def probe() -> None:
        tid = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, tid)
        _lower_priority()
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert seen["after"] == min(19, seen["before"] + NICENESS)
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert caller == seen["before"]  # the calling thread's own priority stays


def test_an_exiting_interpreter_stops_packing_after_the_current_layer_and_exits_cleanly() -> None:
    """Daemon threads still inside PyTorch at exit aborted the process (exit code 134)."""
    script = """
import atexit, torch
from moondream_server.model.background_packing import BackgroundPacking
from moondream_server.model.layers import Fp16Linear
layers = [Fp16Linear(torch.zeros(1024, 1024, dtype=torch.bfloat16), pack=False) for _ in range(200)]
packing = BackgroundPacking(layers, threads=2)
atexit.register(lambda: print("packed", packing.packed, "done", packing.done, flush=True))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _, packed, _, finished = done.stdout.split()
    assert 0 <= int(packed) < 200 and finished == "True"


def test_the_model_says_how_far_packing_has_come_until_it_is_done(random_model: Moondream) -> None:
    """``precision_name`` (what /health shows) counts the packed layers while packing runs."""
    gate = threading.Event()
    layers = _layers(2)
    packing = BackgroundPacking(layers, forget=lambda _: gate.wait(30), threads=1)  # stops after one
    before = random_model.packing
    random_model.packing = packing
    try:
        assert str(random_model.precision) in str(random_model.precision_name)
        for _ in range(300):
            if packing.packed == 1:
                break
            time.sleep(0.01)
        assert random_model.precision_name.endswith("packing in the background: 1 of 2 layers")
        gate.set()
        assert packing.wait(timeout=30)
        assert random_model.precision_name == str(random_model.precision)
    finally:
        gate.set()
        random_model.packing = before
