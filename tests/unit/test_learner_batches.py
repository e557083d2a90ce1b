"""The learner's batch assembly against a real redis-server: what it acks and when (the recovery invariant),
and that replays of its own pending entries neither count as deliveries nor ack anything early."""

from __future__ import annotations

from asyncopd import state, streams
from asyncopd.streams import ScoredEntry
from services.learner.batches import BatchAssembler, trainable

JOB = "j1"


def scored(batch: int, i: int, version: int = 0, job: str = JOB) -> ScoredEntry:
    return ScoredEntry(job_id=job, batch=batch, sample_id=f"b{batch}-p{i}-s0", prompt_token_ids=[1, 2],
                       completion_token_ids=[3], behavior_logprobs=[-0.5], policy_version=version, top_k=1,
                       teacher_sampled_logprobs=[-0.4], support_ids=[3], teacher_support_logprobs=[-0.4])


def add(r, *entries: ScoredEntry) -> list[str]:
    return [r.xadd(streams.SCORED, e.to_fields()) for e in entries]


def assembler(r, checkpointed: int = 0, expected: int = 2, read_count: int = 100) -> BatchAssembler:
    return BatchAssembler(r, "learner", JOB, expected, read_count, max_deliveries=2, checkpointed=checkpointed)


def pending(r) -> set[str]:
    return {p["message_id"] for p in r.xpending_range(streams.SCORED, "learner", "-", "+", 1000)}


def test_entries_are_acked_only_with_the_checkpoint_that_covers_their_step(r):
    r.set(state.ACTIVE, JOB)
    ids = add(r, scored(0, 0), scored(0, 1), scored(1, 0), scored(1, 1))
    a = assembler(r)
    a.poll(0, block_ms=10)
    assert a.complete(0) and a.complete(1)
    a.take(0)
    # Something makes it replay its own pending entries (a restart of the reader, a held-back entry): the
    # trained-but-not-checkpointed batch 0 must stay pending, batch 1 stays buffered once.
    a.consumer.replay_pending()
    for _ in range(3):
        a.poll(1, block_ms=10)
    assert pending(r) == set(ids) and not a.duplicates
    assert len(a.take(1)) == 2
    a.ack(checkpointed=2)
    assert pending(r) == set() and r.xlen(streams.SCORED) == 0


def test_replays_are_not_deliveries_so_buffered_entries_are_never_dead_lettered(r):
    r.set(state.ACTIVE, JOB)
    add(r, scored(3, 0))
    a = assembler(r, expected=5)
    for _ in range(6):  # max_deliveries is 2: six replays would have dead-lettered it
        a.consumer.replay_pending()
        a.poll(3, block_ms=10)
    assert len(a.buffer[3]) == 1 and r.xlen(streams.DEAD_LETTER) == 0
    (p,) = r.xpending_range(streams.SCORED, "learner", "-", "+", 10)
    assert p["times_delivered"] == 1


def test_a_restarted_learner_replays_its_pending_entries_in_pages_then_reads_new_ones(r):
    """A learner killed before its first checkpoint: the next one (same consumer name) gets every entry back,
    `read_count` at a time, and then the entries written since."""
    r.set(state.ACTIVE, JOB)
    first = add(r, *[scored(b, i) for b in range(3) for i in range(2)])
    a = assembler(r)
    a.poll(0, block_ms=10)
    a.take(0)  # trained, then the process died: nothing acked
    later = add(r, scored(3, 0), scored(3, 1))
    b = assembler(r, read_count=2)
    for step in range(4):
        while not b.complete(step):
            b.poll(step, block_ms=10)
        assert {e.sample_id for _, e in b.take(step)} == {f"b{step}-p0-s0", f"b{step}-p1-s0"}
    b.ack(checkpointed=4)
    assert pending(r) == set() and set(first + later).isdisjoint({i for i, _ in r.xrange(streams.SCORED)})


def test_what_is_behind_the_checkpoint_is_acked_at_once_and_copies_with_the_next_checkpoint(r):
    r.set(state.ACTIVE, JOB)
    old = add(r, scored(0, 0))  # trained and checkpointed by a process that died before acking
    a = assembler(r, checkpointed=1)
    fresh = add(r, scored(1, 0), scored(1, 1))
    copy = add(r, scored(1, 1))  # a resumed worker wrote the same sample twice
    while not a.complete(1):
        a.poll(1, block_ms=10)
    assert old[0] not in pending(r)
    assert a.duplicates == copy
    a.take(1)
    a.ack(checkpointed=2)
    assert pending(r) == set() and not set(fresh + copy) & {i for i, _ in r.xrange(streams.SCORED)}


def test_entries_of_a_newer_job_stay_pending_and_of_a_finished_job_are_acked(r):
    r.set(state.ACTIVE, "j2")  # j1 was cancelled while its learner was still reading
    newer, done = add(r, scored(0, 0, job="j2")), add(r, scored(0, 0, job="j0"))
    a = assembler(r)
    a.poll(0, block_ms=10)
    assert pending(r) == set(newer) and done[0] not in pending(r)


def test_the_hard_filter_keeps_samples_within_the_budget_whatever_lineage_made_them():
    assert trainable(scored(5, 0, version=3), step=5, max_staleness=2)
    assert not trainable(scored(5, 0, version=2), step=5, max_staleness=2)
    assert not trainable(scored(5, 0, version=6), step=5, max_staleness=2)  # from the future: a bug upstream
    discarded = scored(5, 0, version=5).model_copy(update={"lineage": 1})
    assert trainable(discarded, step=5, max_staleness=0)
