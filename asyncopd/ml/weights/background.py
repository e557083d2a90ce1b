"""Writing weight versions off the learner's critical path.

A version's write (cast, encode, checksum, write and rename on the shared volume) costs 0.5-2 s of CPU per GB
of a bf16 model here (docs/results/weights.md), 8-30 s per step for an 8B student, every step, while the
GPUs would wait. The learner only needs its own copy of the weights to be frozen before the optimizer moves
them again; everything after that can overlap the next step. So the learner takes an owned snapshot in the
served dtype (the one part it waits for: a device-to-host copy, 0.03 s at 125M here), and one background
thread writes it through the transport and announces it.

Order and memory stay bounded: versions are written and announced strictly in order, and at most one is in
flight; a second `submit` first waits for the first (a volume slower than the step slows the learner, it
never piles up snapshots in host memory). A write that fails is raised in the learner's thread at the next
`submit` or `flush`, as a synchronous write's error would be: the learner crashes, restarts from its
checkpoint and republishes, the same recovery as before. With `background=False` every submit waits for its
write (the learner's `weights_async_publish: false`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from asyncopd.ml.weights.codec import served
from asyncopd.ml.weights.transports.base import WeightPublisher

Announce = Callable[[int, str], None]


class BackgroundPublisher:
    """Rank 0's writer of versions through `publisher`; `announce(version, location)` runs after each write
    (the learner puts the version on the head there)."""

    def __init__(self, publisher: WeightPublisher, *, background: bool = True,
                 on_written: Callable[[WeightPublisher, int, float], None] | None = None) -> None:
        self.publisher = publisher
        self.on_written = on_written
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="weights-publish") if background else None
        self._pending: Future | None = None
        self._location: str | None = None
        self._lock = threading.Lock()

    def submit(self, version: int, state: dict, config_json: str, announce: Announce, owned: bool = False) -> None:
        """Snapshot `state` (name -> tensor; the caller's live parameters) and write it as `version`. `owned`:
        `state` is already a host copy in the publisher's dtype that the caller gives up (ZeRO-3's gathered
        layers), so it is the snapshot itself."""
        self.flush()
        # owned, in the dtype the publisher writes: the optimizer may now move the originals
        snapshot = served(state, self.publisher.dtype, copy=not owned)
        if self._executor is None:
            self._write(version, snapshot, config_json, announce)
        else:
            self._pending = self._executor.submit(self._write, version, snapshot, config_json, announce)

    def _write(self, version: int, snapshot: dict, config_json: str, announce: Announce) -> None:
        t0 = time.perf_counter()
        location = self.publisher.publish(version, snapshot, config_json, owned=True)
        announce(version, location)
        with self._lock:
            self._location = location
        if self.on_written is not None:
            self.on_written(self.publisher, version, time.perf_counter() - t0)

    def flush(self) -> str | None:
        """Wait for the write in flight (raising its error); the location of the newest version written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        with self._lock:
            return self._location

    def close(self) -> None:
        """Finish the write in flight, then stop the thread and the publisher's own background work."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self.publisher.close()
