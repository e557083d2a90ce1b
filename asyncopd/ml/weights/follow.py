"""The follower loop a rollout worker runs between batches: keep its engine on the job's head.

Invariants:
- Same decisions as before (`head.needs_reload`: lineage change, fence, reload lag), same end condition: the
  engine holds a version >= the batch's fence, of the head's lineage.
- Waiting is blocking on the events stream (no sleep-polling), in slices of `wake_s` so a stop request is
  seen within one slice; the whole sync gives up with TimeoutError at `wait_s`, as before.
- A version that cannot be loaded as published (WeightSyncError) is counted in
  asyncopd_weight_sync_failures_total{reason}, logged, and recovered from: the transport tries to make it
  loadable (delta: a full copy from the publisher) and the load is retried once; if it still fails, the
  worker keeps the weights it has and waits for the head to move, never retrying the same bad location.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from asyncopd import phases
from asyncopd.ml.weights import metrics
from asyncopd.ml.weights.head import HeadWatcher, needs_reload
from asyncopd.ml.weights.manifest import WeightSyncError
from asyncopd.ml.weights.transports.base import WeightFollower

log = logging.getLogger(__name__)


class WeightWaitTimeout(TimeoutError):
    """The fenced version did not arrive within `wait_s`: the learner is behind, not the engine at fault."""


class Follower:
    def __init__(self, r, job_id: str, transport: WeightFollower, *, reload_lag: int, wait_s: float,
                 stop: threading.Event | None = None, wake_s: float = 0.25,
                 on_load: Callable[[int], None] | None = None) -> None:
        self.job_id, self.transport = job_id, transport
        self.watch = HeadWatcher(r, job_id)
        self.reload_lag, self.wait_s, self.wake_s = reload_lag, wait_s, wake_s
        self.stop = stop or threading.Event()
        self.on_load = on_load
        self.lineage = 0  # the job's initial student until the learner publishes
        self.failed: tuple[int, int, str] | None = None  # a head that could not be loaded

    def sync(self, engine, at_least: int) -> None:
        """Follow the newest published (lineage, version) — backwards too, after a learner restart — and wait
        until the engine's version reaches `at_least` (the batch's fence)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with phases.timed(phases.REDIS):
                lineage, version, location = self.watch.head()
            if (location and (lineage, version, location) != self.failed
                    and needs_reload((self.lineage, engine.version), (lineage, version), at_least, self.reload_lag)):
                self._load(engine, lineage, version, location, deadline)
            if engine.version >= at_least and (self.lineage == lineage or not location):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stop.is_set():
                raise WeightWaitTimeout(f"policy version {at_least} not loaded within {self.wait_s}s")
            with phases.timed(phases.IDLE):
                self.watch.wait(min(remaining, self.wake_s))

    def _load(self, engine, lineage: int, version: int, location: str, deadline: float) -> None:
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                with phases.timed(phases.WEIGHTS):
                    self.transport.load(location, version, engine)
            except WeightSyncError as exc:
                metrics.SYNC_FAILURES.labels(exc.reason).inc()
                log.warning("job %s: weights v%d (lineage %d) at %s cannot be loaded: %s", self.job_id, version,
                            lineage, location, exc)
                remaining = deadline - time.monotonic()
                if attempt == 1 and remaining > 0 and self.transport.recover(location, version, remaining,
                                                                             self.stop.is_set):
                    continue
                log.warning("job %s: keeping v%d, waiting for a newer version than v%d", self.job_id,
                            engine.version, version)
                self.failed = (lineage, version, location)
                return
            self.lineage, self.failed = lineage, None
            metrics.RELOAD_SECONDS.observe(time.perf_counter() - t0)
            if self.on_load is not None:
                self.on_load(version)
            return
