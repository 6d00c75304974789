"""Packing float16 layers for fbgemm after ``load`` has returned, while the model already serves.

fbgemm packs a weight on one core at ~9 ns per weight (a scalar loop inside fbgemm; nothing
from Python makes it faster), so packing the text model's 1.3 billion weights took ~7 s of a
two-core machine's load. An ``Fp16Linear`` computes the same float32 products unpacked, by
widening its weight on every call (slower for few rows, see ``layers.Fp16Linear``), so the
model is usable at once and each layer switches to its packed form as soon as it is ready.
The packing threads run at a lower priority than the rest of the process: requests that arrive
meanwhile keep the cores, and packing takes what they leave.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from moondream_server.model.layers import Fp16Linear

log = logging.getLogger(__name__)

# Added to the packing threads' nice value (Linux: per thread); 10 leaves a busy neighbour
# about 90 % of a shared core.
NICENESS = 10

# Each thread widens weights into a float32 buffer of its own for fbgemm, sized for the largest
# layer up to this many weights (the text MLPs' 16.8 M: 64 MiB); larger ones (the 105 M-weight
# LM head) get a fresh buffer of their own.
SCRATCH_WEIGHTS = 1 << 24


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: run as is
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS))


class BackgroundPacking:
    """Packs `layers` in order on `threads` low-priority threads, started at construction.

    `forget` is called with each 16-bit weight a layer lets go of (to drop the checkpoint's
    pages behind it); `finished` once with nothing left to pack. A layer whose packing fails
    is logged and stays unpacked: it still computes, only slower.
    """

    def __init__(
        self,
        layers: list[Fp16Linear],
        *,
        forget: Callable[[torch.Tensor], None] = lambda _: None,
        finished: Callable[[], None] = lambda: None,
        threads: int = 1,
    ) -> None:
        self.total = len(layers)
        self._layers = layers
        sizes = [n for layer in layers if (n := layer.in_features * layer.out_features) <= SCRATCH_WEIGHTS]
        self._scratch_size = max(sizes, default=0)
        self._queue = list(reversed(layers))  # popped from the end: first layer first
        self._forget = forget
        self._finished = finished
        self._lock = threading.Lock()
        self._running = max(1, min(threads, self.total))
        self._done = threading.Event()
        self._started = time.perf_counter()
        self.seconds: float | None = None  # how long packing took, once done
        if not layers:
            self._finish()
            return
        # Not daemons: a daemon thread still inside PyTorch when the interpreter exits aborts the
        # process ("terminate called without an active exception"). The interpreter joins these
        # at exit instead, and they stop after their current layer once the main thread is done.
        for i in range(self._running):
            threading.Thread(target=self._work, name=f"fp16-packing-{i}").start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def packed(self) -> int:
        """How many of the layers are packed by now."""
        return sum(layer.packed for layer in self._layers)

    def wait(self, timeout: float | None = None) -> bool:
        """True once every layer has been tried (within `timeout` seconds, if given)."""
        return self._done.wait(timeout)

    def _next(self) -> Fp16Linear | None:
        if not threading.main_thread().is_alive():  # the interpreter is exiting: stop here
            return None
        with self._lock:
            return self._queue.pop() if self._queue else None

    def _work(self) -> None:
        _lower_priority()
        scratch = torch.empty(self._scratch_size, dtype=torch.float32)
        while (layer := self._next()) is not None:
            try:
                released = layer.pack(scratch)
            except Exception:  # the layer keeps computing unpacked; say so, carry on
                shape = f"{layer.out_features}x{layer.in_features}"
                log.exception("packing a %s layer failed; it stays unpacked", shape)
                continue
            if released is not None:
                self._forget(released)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self.seconds = time.perf_counter() - self._started
        self._forget = lambda _: None  # let go of what it held (the checkpoint's reader and map)
        try:
            self._finished()
        finally:
            self._done.set()
            packed = self.packed
            log.info("%d of %d fp16 layers packed for fbgemm in %.1f s", packed, self.total, self.seconds)
