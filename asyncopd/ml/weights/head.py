"""The head: which (lineage, version, location) is current, the rule for when a follower reloads, and a
blocking wait for the head to move. Torch-free.

Invariants (kept exactly as before this package existed; tests/unit/test_reload_policy.py, test_state.py):
- `state.publish_version` is the one way to announce: location, version and lineage are set and a `version`
  event is added to the events stream in one transaction, so a reader never sees a mixed head, and every
  head change is followed by an event.
- A follower reloads when the learner's lineage changed (a restarted learner: its head may lie *behind* what
  is loaded), when the loaded version is below a batch's fence, or when the head is more than `reload_lag`
  versions ahead.
- `HeadWatcher.wait` returns when an event was added after the head this watcher last read, or at its
  timeout: it remembers the events stream's last id *before* reading the head, so a publish between the two
  reads is never missed (at worst it wakes once for a head already seen).
"""

from __future__ import annotations

from asyncopd import state

# The announce contract lives in asyncopd.state (the coordinator reads the version from there too).
announce = state.publish_version
policy_head = state.policy_head
new_lineage = state.new_lineage


def needs_reload(loaded: tuple[int, int], head: tuple[int, int], fence: int, lag: int) -> bool:
    """Whether to load the newest published (lineage, version) before generating a batch fenced at `fence`."""
    if head[0] != loaded[0] or head[1] < loaded[1]:
        return True  # a restarted learner's new lineage: its head may lie behind what is loaded
    return head[1] > loaded[1] and (loaded[1] < fence or head[1] - loaded[1] > lag)


class HeadWatcher:
    """Reads a job's head and blocks (XREAD BLOCK on the events stream) until it may have changed."""

    def __init__(self, r, job_id: str) -> None:
        self.r, self.job_id = r, job_id
        self.last_id = "0-0"

    def head(self) -> tuple[int, int, str | None]:
        """(lineage, version, location), in one round trip; the events stream's position is taken first in it
        (see the module doc)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xrevrange(state.EVENTS, count=1)
        pipe.mget(state.version_key(self.job_id), state.lineage_key(self.job_id), state.head_path_key(self.job_id))
        newest, (version, lineage, location) = pipe.execute()
        if newest:
            self.last_id = _text(newest[0][0])
        return int(lineage or 0), int(version or 0), _text(location) if location is not None else None

    def wait(self, timeout_s: float) -> bool:
        """Block until an event newer than the last head read arrives (True) or `timeout_s` passes (False)."""
        got = self.r.xread({state.EVENTS: self.last_id}, count=1, block=max(1, int(timeout_s * 1000)))
        return bool(got and got[0][1])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
