"""Stream schemas and the consumer-group reader against a real redis-server."""

import pytest

from asyncopd import streams
from asyncopd.streams import PromptEntry, RolloutEntry, SchemaError, ScoredEntry, StreamConsumer


def prompt(batch=0, i=0, job="j1"):
    return PromptEntry(job_id=job, batch=batch, prompt_id=f"b{batch}-p{i}", prompt="Q: 1+1= A:", n=4,
                       max_tokens=8, temperature=1.0, seed=7, min_version=0)


def test_scored_entry_roundtrip_keeps_arrays_exact():
    e = ScoredEntry(job_id="j", batch=3, sample_id="b3-p1-s0", prompt_token_ids=[1, 2, 3],
                    completion_token_ids=[4, 5], behavior_logprobs=[-0.5, -1.25], policy_version=2, top_k=2,
                    teacher_sampled_logprobs=[-0.25, -2.0], support_ids=[4, 9, 5, 1],
                    teacher_support_logprobs=[-0.25, -3.0, -2.0, -2.5],
                    teacher_samples=1, teacher_sample_ids=[4, 7], teacher_sample_logprobs=[-0.25, -1.5])
    back = ScoredEntry.from_fields(e.to_fields())
    assert back == e


def test_float16_support_logprobs_are_a_quarter_smaller_and_within_half_precision():
    k, length = 32, 64
    lp = [-(i % 997) / 40.0 for i in range(length * k)]  # 0 .. -24.9 nats: a teacher's top-32 spans this
    kw = dict(job_id="j", batch=0, sample_id="s", prompt_token_ids=[1], completion_token_ids=list(range(length)),
              behavior_logprobs=[-0.5] * length, policy_version=0, top_k=k, teacher_sampled_logprobs=[-0.5] * length,
              support_ids=list(range(length * k)), teacher_support_logprobs=lp)
    full, half = ScoredEntry(**kw), ScoredEntry(**kw, support_logprobs_dtype="float16")
    back = ScoredEntry.from_fields(half.to_fields())
    assert back.support_logprobs_dtype == "float16" and back.behavior_logprobs == full.behavior_logprobs
    # 11 significant bits: half an ulp relative error, at most 2^-7 nats below -16.
    assert all(abs(b - a) <= abs(a) * 2**-11 for a, b in zip(lp, back.teacher_support_logprobs, strict=True))
    size = {e.support_logprobs_dtype: len(e.to_fields()["body"]) for e in (full, half)}
    assert 0.70 < size["float16"] / size["float32"] < 0.80, size
    # A log-prob beyond half's range becomes its most negative finite value, never an error or -inf.
    far = ScoredEntry(**{**kw, "teacher_support_logprobs": [-1e6] * (length * k)}, support_logprobs_dtype="float16")
    assert set(ScoredEntry.from_fields(far.to_fields()).teacher_support_logprobs) == {-65504.0}


def test_a_truncated_float16_array_is_a_schema_error():
    e = ScoredEntry(job_id="j", batch=0, sample_id="s", prompt_token_ids=[1], completion_token_ids=[2],
                    behavior_logprobs=[-0.5], policy_version=0, top_k=1, teacher_sampled_logprobs=[-0.5],
                    support_ids=[2], teacher_support_logprobs=[-0.5], support_logprobs_dtype="float16")
    fields = e.to_fields()
    fields["body"] = fields["body"].replace(streams.pack_halves([-0.5]), "AA==")  # one byte of a two-byte half
    with pytest.raises(SchemaError, match="multiple of 2"):
        ScoredEntry.from_fields(fields)


@pytest.mark.parametrize("fields", [
    {},
    {"schema": "asyncopd.prompt/999", "body": "{}"},
    {"schema": "asyncopd.rollout/1", "body": "not json"},
    {"schema": "asyncopd.rollout/1", "body": '{"job_id": "j", "batch": 0}'},
    {"schema": "asyncopd.rollout/1", "body": '{"job_id":"j","batch":0,"sample_id":"s","prompt_token_ids":"AAA",'
                                             '"completion_token_ids":"","behavior_logprobs":"","policy_version":0}'},
])
def test_malformed_entries_raise_schema_error(fields):
    with pytest.raises(SchemaError):
        RolloutEntry.from_fields(fields)


def test_malformed_entry_goes_to_dead_letter_and_good_ones_survive(r):
    c = StreamConsumer(r, streams.PROMPTS, "w1")
    r.xadd(streams.PROMPTS, {"garbage": "1"})
    r.xadd(streams.PROMPTS, prompt().to_fields())
    good = c.decode(c.read(10, 100), PromptEntry)
    assert [e.prompt_id for _, e in good] == ["b0-p0"]
    dead = r.xrange(streams.DEAD_LETTER)
    assert len(dead) == 1 and dead[0][1]["stream"] == streams.PROMPTS and "schema" in dead[0][1]["reason"]
    # Unparseable entries belong to no batch: nothing is charged as lost.
    assert r.hgetall(streams.lost_key("j1")) == {}


def test_dead_consumer_entries_are_reclaimed_then_dead_lettered_after_max_deliveries(r):
    r.xadd(streams.PROMPTS, prompt(batch=2).to_fields())
    dead = StreamConsumer(r, streams.PROMPTS, "dead", reclaim_idle_ms=1, max_deliveries=2)
    assert len(dead.read(10, 100)) == 1  # taken, never acked: its worker "died"
    alive = StreamConsumer(r, streams.PROMPTS, "alive", reclaim_idle_ms=1, max_deliveries=2)
    alive._replay_own = False
    import time

    time.sleep(0.01)
    got = alive.read(10, 100)
    assert len(got) == 1 and got[0].deliveries == 2
    assert len(alive.decode(got, PromptEntry)) == 1  # 2 deliveries: still allowed
    time.sleep(0.01)
    again = alive.read(10, 100)
    assert again[0].deliveries == 3
    assert alive.decode(again, PromptEntry) == []  # over the limit: dead-lettered
    assert r.hget(streams.lost_key("j1"), "2") == "4"  # the prompt's 4 samples are charged to batch 2
    assert r.xlen(streams.DEAD_LETTER) == 1
    assert streams.stream_stats(r, streams.PROMPTS)["pending"] == 0


def test_a_dead_letter_retried_after_redis_applied_it_charges_the_batch_once(r):
    """The retry of a dead-letter whose reply was lost (Redis stopped mid-reply) re-sends the same command: the
    entry is already acked, so neither the lost-samples counter nor the dead-letter stream changes again."""
    r.xadd(streams.PROMPTS, prompt(batch=1).to_fields())
    c = StreamConsumer(r, streams.PROMPTS, "w1")
    (msg,) = c.read(10, 100)
    entry = PromptEntry.from_fields(msg.fields)
    c.dead_letter(msg, "worker gave up", entry)
    c.dead_letter(msg, "worker gave up", entry)  # the retry
    assert r.hgetall(streams.lost_key("j1")) == {"1": "4"}
    (_, fields), = r.xrange(streams.DEAD_LETTER)
    assert (fields["stream"], fields["id"], fields["reason"]) == (streams.PROMPTS, msg.id, "worker gave up")
    assert PromptEntry.from_fields(fields).prompt_id == "b1-p0"  # the entry itself is kept
    assert r.xlen(streams.PROMPTS) == 0 and streams.stream_stats(r, streams.PROMPTS)["pending"] == 0


def test_restarted_consumer_replays_its_own_pending_first_without_counting_a_delivery(r):
    """Reading one's own pending entries again is not a delivery (only `>` reads and reclaims are): a
    consumer that holds entries on purpose (the learner, until a checkpoint) and replays them after a
    restart must not walk them towards the dead-letter stream."""
    ids = [r.xadd(streams.SCORED, {"schema": "x", "body": str(i)}) for i in range(5)]
    first = StreamConsumer(r, streams.SCORED, "learner", reclaim_idle_ms=None)
    assert len(first.read(10, 100)) == 5
    new = r.xadd(streams.SCORED, {"schema": "x", "body": "new"})
    restarted = StreamConsumer(r, streams.SCORED, "learner", reclaim_idle_ms=None)
    pages = [restarted.read(2, 100) for _ in range(4)]  # pages of 2: the five pending, then the new one
    assert [[m.id for m in page] for page in pages] == [ids[:2], ids[2:4], ids[4:], [new]]
    assert all(m.deliveries == 1 for page in pages for m in page)


def test_ack_deletes_so_stream_length_is_the_backlog(r):
    c = StreamConsumer(r, streams.ROLLOUTS, "t1")
    for _ in range(3):
        r.xadd(streams.ROLLOUTS, {"a": "b"})
    msgs = c.read(10, 100)
    c.ack([m.id for m in msgs[:2]])
    assert streams.stream_stats(r, streams.ROLLOUTS) == {"length": 1, "pending": 1}


def test_write_appends_in_order_and_runs_the_extra_commands_in_the_same_transaction(r):
    streams.write(r, streams.PROMPTS, [prompt(i=0), prompt(i=1)], also=lambda pipe: pipe.set("released", 1))
    got = [PromptEntry.from_fields(f) for _, f in r.xrange(streams.PROMPTS)]
    assert [e.prompt_id for e in got] == ["b0-p0", "b0-p1"] and r.get("released") == "1"


def test_reads_and_serialization_are_accounted_by_phase_and_waiting_is_idle(r):
    from asyncopd.phases import IDLE, PHASE_SECONDS, REDIS, SERIALIZE

    def seconds(phase):
        return PHASE_SECONDS.labels(phase)._value.get()

    c = StreamConsumer(r, streams.PROMPTS, "w1", reclaim_idle_ms=None)
    before = {p: seconds(p) for p in (IDLE, REDIS, SERIALIZE)}
    assert c.read(10, 200) == []  # nothing queued: the blocking wait is idle time
    assert seconds(IDLE) - before[IDLE] >= 0.15
    idle = seconds(IDLE)
    streams.write(r, streams.PROMPTS, [prompt()])
    c.decode(c.read(10, 200), PromptEntry)
    assert seconds(REDIS) > before[REDIS] and seconds(SERIALIZE) > before[SERIALIZE]
    assert seconds(IDLE) == idle  # the second read found work at once: no wait at all


def test_results_and_the_ack_of_their_inputs_commit_together(r):
    prompts = StreamConsumer(r, streams.PROMPTS, "w1", reclaim_idle_ms=None)
    streams.write(r, streams.PROMPTS, [prompt(i=0), prompt(i=1)])
    held = prompts.read(10, 100)
    assert r.xpending(streams.PROMPTS, "rollout")["pending"] == 2
    out = [RolloutEntry(job_id="j1", batch=0, sample_id=f"b0-p{i}-s0", prompt_token_ids=[1], completion_token_ids=[2],
                        behavior_logprobs=[-0.5], policy_version=0) for i in range(2)]
    streams.write(r, streams.ROLLOUTS, out, also=lambda pipe: prompts.ack_in(pipe, [m.id for m in held]))
    assert r.xpending(streams.PROMPTS, "rollout")["pending"] == 0 and r.xlen(streams.PROMPTS) == 0
    assert r.xlen(streams.ROLLOUTS) == 2


def test_entries_of_a_consumer_whose_heartbeat_is_gone_are_claimed_at_once(r):
    """A killed worker's entries go to a live one without waiting for reclaim_idle_ms (60 s by default); a
    live worker's are left alone however idle; dead consumers holding nothing leave the group."""
    from asyncopd import state
    from asyncopd.records import Heartbeat

    def beat(name):
        state.heartbeat(r, Heartbeat(service="rollout", instance=name, seen=0, pid=1, grpc_port=0, metrics_port=0),
                        ttl_s=30)

    for name in ("slow", "alive"):
        beat(name)
    for i in range(2):
        r.xadd(streams.PROMPTS, prompt(i=i).to_fields())
    for name in ("killed", "slow"):  # each takes one entry (and, with reclaim off, leaves the other's alone)
        assert len(StreamConsumer(r, streams.PROMPTS, name, reclaim_idle_ms=None).read(1, 10)) == 1
    StreamConsumer(r, streams.PROMPTS, "gone-idle")._xreadgroup(">", 1, None)  # a consumer with nothing pending
    alive = StreamConsumer(r, streams.PROMPTS, "alive", reclaim_idle_ms=60_000)
    got = alive.read(10, 10)
    assert [PromptEntry.from_fields(m.fields).prompt_id for m in got] == ["b0-p0"] and got[0].deliveries == 2
    names = {c["name"] for c in r.xinfo_consumers(streams.PROMPTS, "rollout")}
    assert names == {"alive", "slow", "killed"}  # `killed` still held the entry when it was looked at
    alive._next_reclaim = 0
    alive.read(10, 10)
    assert {c["name"] for c in r.xinfo_consumers(streams.PROMPTS, "rollout")} == {"alive", "slow"}
