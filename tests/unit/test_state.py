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
