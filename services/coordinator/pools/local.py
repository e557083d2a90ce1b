"""Rollout workers as child processes of the coordinator (`asyncopd up`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from services.coordinator.pools.base import RolloutPool

log = logging.getLogger(__name__)


class LocalPool(RolloutPool):
    """Rollout workers as child processes of the coordinator (`asyncopd up`), kept at the desired count the
    way a Deployment keeps its replicas: a worker that exits (killed, crashed, drained) is reaped and replaced
    within `check_s`."""

    def __init__(self, replicas: int, log_dir: Path, env: dict[str, str] | None = None, check_s: float = 1.0) -> None:
        self.log_dir, self.env = log_dir, env or {}
        self.procs: list[subprocess.Popen] = []
        self.stopping: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.counter = 0
        self.restarts = 0
        self.closed = threading.Event()
        self.scale(replicas)
        self.supervisor = threading.Thread(target=self._supervise, args=(check_s,), daemon=True,
                                           name="rollout-pool")
        self.supervisor.start()

    def _supervise(self, check_s: float) -> None:
        while not self.closed.wait(check_s):
            with self.lock:
                if self.closed.is_set():
                    return
                self.stopping = [p for p in self.stopping if p.poll() is None]  # reaps the ones that are done
                for i, proc in enumerate(self.procs):
                    if proc.poll() is not None:
                        log.warning("rollout worker pid %d exited with %s; starting a replacement", proc.pid,
                                    proc.returncode)
                        self.procs[i] = self._spawn()
                        self.restarts += 1

    def desired(self) -> int:
        return len(self.procs)

    def scale(self, replicas: int) -> int:
        with self.lock:
            self.procs = [p for p in self.procs if p.poll() is None]
            while len(self.procs) < replicas:
                self.procs.append(self._spawn())
            while len(self.procs) > replicas:
                proc = self.procs.pop()  # newest first: the oldest workers hold warm engines longest
                proc.terminate()
                self.stopping.append(proc)
            return len(self.procs)

    def _spawn(self) -> subprocess.Popen:
        self.counter += 1
        name = f"rollout-{os.getpid()}-{self.counter}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "ASYNCOPD_INSTANCE": name, "ASYNCOPD_GRPC_PORT": "0",
               "ASYNCOPD_METRICS_PORT": "0"}
        for secret in ("ASYNCOPD_API_TOKEN", "ASYNCOPD_API_TOKEN_FILE"):  # the coordinator's alone
            env.pop(secret, None)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.rollout"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        log.info("started rollout worker %s (pid %d)", name, proc.pid)
        return proc

    def close(self) -> None:
        self.closed.set()
        self.scale(0)
        for proc in self.stopping:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
