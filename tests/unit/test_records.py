"""The typed records that cross process boundaries: round trips, schema versions, refusals."""

import pytest

from asyncopd.records import (
    CompletedEvent,
    EvalRecord,
    FailedEvent,
    Heartbeat,
    Progress,
    RecordError,
    StepRecord,
    VersionEvent,
    event_fields,
    parse_event,
)


def step(n: int, samples: int = 8, dropped: int = 0, max_staleness: int = 1, loss: float = 0.5) -> StepRecord:
    return StepRecord(step=n, version=n, samples=samples, dropped_stale=dropped, lost=0, staleness={"1": samples},
                      max_staleness=max_staleness, mean_staleness=1.0, loss=loss, behavior_kl=0.25, tokens=48,
                      objective={"kl_estimate": 0.3}, step_s=0.1, wait_s=0.01, publish_s=0.02, time=1.0)


def test_step_and_eval_records_round_trip_with_their_schema():
    record = step(3)
    text = record.dumps()
    assert '"schema":"asyncopd.step/1"' in text
    assert StepRecord.loads(text) == record
    ev = EvalRecord(step=0, accuracy=None, kl_to_teacher=0.7, eval_s=1.5, time=2.0)
    assert EvalRecord.loads(ev.dumps()) == ev


@pytest.mark.parametrize("text,why", [
    ('{"step": 1}', "expected schema asyncopd.step/1, got None"),
    ('{"schema": "asyncopd.step/2", "step": 1}', "got 'asyncopd.step/2'"),
    ('{"schema": "asyncopd.eval/1", "step": 1}', "got 'asyncopd.eval/1'"),
    ('{"schema": "asyncopd.step/1", "step": "x"}', "malformed asyncopd.step record"),
    ("not json", "malformed asyncopd.step record"),
    ("[1, 2]", "malformed asyncopd.step record"),
])
def test_a_record_of_another_schema_or_shape_is_refused_not_misread(text, why):
    with pytest.raises(RecordError, match=why.replace("(", r"\(")):
        StepRecord.loads(text)


def test_progress_accumulates_steps_and_survives_its_hash():
    progress = Progress()
    for n, (samples, dropped, stale) in enumerate([(8, 0, 1), (6, 2, 3), (8, 0, 0)], start=1):
        progress = progress.add(step(n, samples, dropped, stale, loss=1.0 / n))
    assert progress == Progress(step=3, samples_trained=22, samples_dropped_stale=2, max_staleness_trained=3,
                                last_loss=1 / 3, last_kl=0.25)
    assert Progress.from_hash(progress.to_hash()) == progress
    assert Progress.from_hash({}) == Progress()


def test_job_events_are_a_discriminated_union_on_the_wire():
    for event in (VersionEvent(job_id="j", service="learner", version=4),
                  FailedEvent(job_id="j", service="rollout", reason="boom"),
                  CompletedEvent(job_id="j", service="learner", result_dir="/out/student")):
        assert parse_event(event_fields(event)) == event
    with pytest.raises(RecordError, match="expected schema"):
        parse_event({"job_id": "j", "kind": "failed"})  # the untyped shape of before
    with pytest.raises(RecordError, match="malformed job event"):
        parse_event({"schema": "asyncopd.event/1", "body": '{"kind": "exploded", "job_id": "j", "service": "x"}'})


def test_heartbeat_hash_round_trip_ignores_fields_it_does_not_know():
    hb = Heartbeat(service="rollout", instance="w1", seen=1.0, pid=7, host="10.0.0.3", grpc_port=5000,
                   metrics_port=9000, ready=True, job_id="j", model_loaded=True, policy_version=3, processed=12)
    h = hb.to_hash()
    assert Heartbeat.from_hash(h) == hb
    assert Heartbeat.from_hash({**h, "added_later": "1"}) == hb
