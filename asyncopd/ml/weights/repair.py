"""Repairs: a follower that cannot load a published version asks the publisher for a full copy of it.

Why: a delta is only as good as its file. When that file is corrupt, truncated or gone, no follower can
rebuild the version from the shared volume; with `max_staleness` 0 the batch fenced at that version would
wait until the rollout's deadline, the entries would be dead-lettered and the step lost. The learner still
holds the version it just published, so it writes it again as a full version and the job goes on.

Protocol (Redis lists, torch-free): the follower RPUSHes `{"version": v, "reply": KEY}` on the job's repair
list and BLPOPs KEY; the publisher's responder thread BLPOPs the repair list, writes version v as a full
version (in place, same location) if v is the one it holds, and answers `written` or `gone` (a newer version
is published: load that instead). Replies expire, so an abandoned request leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

log = logging.getLogger(__name__)

WRITTEN, GONE = "written", "gone"


def repair_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:weights:repair"


def request_full(r, job_id: str, version: int, timeout_s: float, stopped=lambda: False) -> str | None:
    """Ask the publisher to write `version` as a full version; `written`, `gone`, or None on timeout or
    once `stopped()` (checked every second: a stopping worker does not wait out a slow repair)."""
    reply = f"{repair_key(job_id)}:reply:{uuid.uuid4().hex}"
    pipe = r.pipeline()
    pipe.rpush(repair_key(job_id), json.dumps({"version": version, "reply": reply, "until": time.time() + timeout_s}))
    pipe.expire(repair_key(job_id), 600)  # nobody serving this job: the requests go away
    pipe.execute()
    deadline = time.monotonic() + timeout_s
    while not stopped() and time.monotonic() < deadline:
        got = r.blpop([reply], timeout=1)
        if got is not None:
            value = got[1]
            return value.decode() if isinstance(value, bytes) else value
    return None


class RepairResponder:
    """A daemon thread on the publisher: answers repair requests with `write(version) -> bool` until closed
    or `done()` says the job is over."""

    def __init__(self, r, job_id: str, write: Callable[[int], bool], done: Callable[[], bool] = lambda: False,
                 poll_s: int = 1) -> None:
        self.r, self.key, self.write, self.done, self.poll_s = r, repair_key(job_id), write, done, poll_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"weights-repair-{job_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.done():
                    return
                got = self.r.blpop([self.key], timeout=self.poll_s)
                if got is None:
                    continue
                request = json.loads(got[1])
                if request.get("until", float("inf")) < time.time():
                    continue  # its follower stopped waiting: a full copy now would be written for nobody
                answer = WRITTEN if self.write(int(request["version"])) else GONE
                log.warning("weights: repair of version %s requested: %s", request["version"], answer)
                pipe = self.r.pipeline()
                pipe.rpush(request["reply"], answer)
                pipe.expire(request["reply"], 60)
                pipe.execute()
            except Exception:  # the responder must outlive one bad request or a Redis hiccup
                log.exception("weights: repair responder")
                self.stop.wait(self.poll_s)

    def close(self) -> None:
        self.stop.set()
