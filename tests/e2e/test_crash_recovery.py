"""How long a crash stalls a job: SIGKILL the rollout worker or the teacher mid-job on a supervised local stack
(`asyncopd up`: the coordinator's pool replaces a rollout worker, the supervisor restarts the teacher) and time
from the kill until the learner is two steps past where it was. With max_staleness 1 those two steps need every
batch the dead one held work of, so they prove its pending entries were recovered. reclaim_idle_ms stays at its
60 s default: the replacement takes them over as soon as the dead one's heartbeat is gone
(`StreamConsumer._claim_from_dead`), so recovery is bounded by the heartbeat TTL (10 s) and the replacement's
start-up, not by the idle-time reclaim. `pytest -s` prints the measured timeline."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from asyncopd import state, streams
from asyncopd.client import Client
from asyncopd.ports import free_port
from asyncopd.tools import localstack
from tests.helpers import check_accounting, submit, tiny_job, wait_job
from tests.helpers import steps as job_steps

pytestmark = pytest.mark.slow

STREAM = {"rollout": streams.PROMPTS, "teacher": streams.ROLLOUTS}
RECLAIM_IDLE_S = 60  # EngineSettings.reclaim_idle_ms's default, in effect here
BOUND_S = 40  # well under RECLAIM_IDLE_S: a regression to idle-time reclaim cannot pass; noisy machines can


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    run_dir = tmp_path_factory.mktemp("crash-stack")
    with pytest.MonkeyPatch.context() as mp:  # the defaults, for every process (restarts too): nothing shortened
        for name in ("ASYNCOPD_RECLAIM_IDLE_MS", "ASYNCOPD_HEARTBEAT_TTL_S"):
            mp.delenv(name, raising=False)
        info = localstack.up(run_dir, http_port=free_port(), engine="hf", rollouts=1, supervised=True)
        try:
            yield info
        finally:
            localstack.down(run_dir)


def one_live(r: redis.Redis, role: str, timeout_s: float = 90) -> state.Heartbeat:
    """The role's single instance, once only a live one is registered (a previous test's victim may still be
    in the registry until its heartbeat expires)."""
    deadline = time.monotonic() + timeout_s
    while True:
        localstack.reap_children()
        live = [s for s in state.live_services(r, role) if localstack.pid_alive(s.pid) and not s.draining]
        if len(live) == 1 and len(state.live_services(r, role)) == 1:
            return live[0]
        assert time.monotonic() < deadline, f"no single live {role}: {state.live_services(r, role)}"
        time.sleep(0.2)


def pending_of(r: redis.Redis, role: str) -> dict[str, int]:
    return {c["name"]: c["pending"] for c in r.xinfo_consumers(STREAM[role], role)}


@pytest.mark.parametrize("role", ["rollout", "teacher"])
def test_a_killed_service_s_work_is_recovered_well_before_the_idle_reclaim(stack, tiny_models, role):
    api = stack["api_url"]
    r = redis.Redis.from_url(stack["redis_url"], decode_responses=True)
    one_live(r, role)
    total = 20
    job = submit(api, tiny_job(tiny_models, max_staleness=1, train={"steps": total, "checkpoint_every": 10}))
    with Client(api) as c:
        victim = None
        deadline = time.monotonic() + 180
        while victim is None:
            assert time.monotonic() < deadline, f"the {role} was never seen holding work past step 3"
            step = c.job(job["id"]).progress.step
            assert step < total - 3, f"the job got to step {step} before the {role} could be killed"
            if step >= 3:
                pending = pending_of(r, role)
                holders = [s for s in state.live_services(r, role) if pending.get(s.instance, 0) > 0]
                if holders:
                    victim = holders[0]
                    held = pending[victim.instance]
                    os.kill(victim.pid, signal.SIGKILL)
                    t_kill = time.monotonic()
                    break
            time.sleep(0.02)
        kill_step = max(step, c.job(job["id"]).progress.step)  # it may have stepped between the read and the kill
        timeline: dict[str, float] = {}
        while True:
            localstack.reap_children()  # the test started the first teacher: its zombie would hide the death
            now = time.monotonic() - t_kill
            if "heartbeat gone" not in timeline and not r.exists(state.service_key(role, victim.instance)):
                timeline["heartbeat gone"] = now
            if "replacement loaded" not in timeline and any(
                    s.pid != victim.pid and s.model_loaded for s in state.live_services(r, role)):
                timeline["replacement loaded"] = now
            if "held work claimed" not in timeline and not pending_of(r, role).get(victim.instance):
                timeline["held work claimed"] = now
            if c.job(job["id"]).progress.step >= kill_step + 2:
                timeline[f"step {kill_step + 2}"] = now
                break
            assert now < RECLAIM_IDLE_S + 30, f"no recovery {now:.0f} s after killing the {role}: {timeline}"
            time.sleep(0.1)
    recovered = timeline[f"step {kill_step + 2}"]
    print(f"\n{role} (pid {victim.pid}, {held} pending) SIGKILLed at step {kill_step}: "
          + ", ".join(f"{k} +{v:.1f} s" for k, v in timeline.items()))
    print(f"{role} RECOVERY {recovered:.1f} s (bound {BOUND_S} s, reclaim idle {RECLAIM_IDLE_S} s)")
    assert recovered < BOUND_S, f"the {role}'s work took {recovered:.1f} s to recover: {timeline}"
    done = wait_job(api, job["id"], timeout_s=300)
    check_accounting(done, job_steps(api, job["id"]), 1)
    assert done["progress"]["samples_dead_lettered"] == 0
