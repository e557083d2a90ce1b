"""Job state keys against a real redis-server: the active job, the policy head and its version events."""

from asyncopd import state
from asyncopd.jobspec import JobSpec
from asyncopd.records import Heartbeat, VersionEvent, parse_event


def start(r, job_id: str) -> None:
    spec = JobSpec.model_validate({"name": "t", "student": {"model": "/m/s"}, "teacher": {"model": "/m/t"},
                                   "prompts": {"path": "/p.jsonl"}})
    r.hset(state.job_key(job_id), mapping={"spec": spec.model_dump_json(), "output_dir": "/o", "state": "running"})
    r.set(state.ACTIVE, job_id)


def test_a_known_active_job_is_reused_until_it_stops_being_active(r):
    start(r, "j1")
    job = state.active_job(r)
    assert job.id == "j1" and job.spec.name == "t"
    assert state.active_job(r, known=job) is job
    r.delete(state.ACTIVE)  # what the coordinator does in the transaction that ends the job
    assert state.active_job(r, known=job) is None
    start(r, "j2")
    assert state.active_job(r, known=job).id == "j2"


def test_publish_makes_the_head_visible_in_one_read_and_wakes_the_coordinator(r):
    assert state.policy_head(r, "j1") == (0, 0, None)
    state.publish_version(r, "j1", 3, "/w/v3", lineage=1)
    assert state.policy_head(r, "j1") == (1, 3, "/w/v3") and state.policy_version(r, "j1") == 3
    (_, fields), = r.xrange(state.EVENTS)
    assert parse_event(fields) == VersionEvent(job_id="j1", service="learner", version=3)



def test_live_services_lists_each_instance_once_when_scan_repeats_keys(r):
    """SCAN may return a key more than once (documented; it happens while Redis rehashes). The real client,
    made to repeat every key, must still give one entry per instance (the bench sums their counters)."""
    for i in range(3):
        state.heartbeat(r, Heartbeat(service="rollout", instance=f"w{i}", seen=0.0, pid=1, grpc_port=0,
                                     metrics_port=9000 + i), ttl_s=30)
    scan_iter = r.scan_iter
    r.scan_iter = lambda **kw: (key for key in scan_iter(**kw) for _ in range(2))
    assert [s.instance for s in state.live_services(r, "rollout")] == ["w0", "w1", "w2"]


def test_a_record_appended_again_by_a_retry_is_stored_once(r):
    """A service's client retries a command whose connection broke; if Redis had applied it and stopped before
    replying (SIGTERM mid-reply, as in the outage e2e test), the retry sends the same record again: it must
    not become a second step."""
    state.append_record(r, "steps", '{"step": 1, "time": 1.0}', "progress", {"step": 1})
    state.append_record(r, "steps", '{"step": 1, "time": 1.0}', "progress", {"step": 1})  # the retry
    state.append_record(r, "steps", '{"step": 2, "time": 2.0}', "progress", {"step": 2, "trained": 8})
    assert r.lrange("steps", 0, -1) == ['{"step": 1, "time": 1.0}', '{"step": 2, "time": 2.0}']
    assert r.hgetall("progress") == {"step": "2", "trained": "8"}
    state.append_record(r, "evals", "e1")  # no hash
    assert r.lrange("evals", 0, -1) == ["e1"] and not r.exists("")
