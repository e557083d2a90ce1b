"""The local rollout pool keeps its workers at the desired count, like a Deployment: real worker processes."""

import os
import signal
import time

from services.coordinator.pools.local import LocalPool


def test_a_killed_worker_is_reaped_and_replaced(redis_server, tmp_path):
    pool = LocalPool(2, tmp_path / "logs", env={"ASYNCOPD_REDIS_URL": redis_server}, check_s=0.2)
    try:
        victim = pool.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pool.restarts < 1:
            assert time.monotonic() < deadline, "no replacement within 30 s"
            time.sleep(0.1)
        assert victim.poll() == -signal.SIGKILL  # reaped, not a zombie
        assert pool.desired() == 2 and all(p.poll() is None for p in pool.procs)
        assert victim not in pool.procs
        assert pool.scale(1) == 1  # scaling down is not undone by the supervisor
        time.sleep(0.6)
        assert pool.restarts == 1 and len(pool.procs) == 1
    finally:
        pool.close()
    assert all(p.poll() is not None for p in pool.procs + pool.stopping)
