"""Assembles the learner's step batches from the scored stream.

Step t trains on batch t: the samples of the prompts the coordinator released as batch t. Admission control
released them with a version fence of t − η, so none is staler than η unless something went wrong — which
the hard filter in the trainer catches and counts. A batch is complete when every one of its samples has
arrived or been dead-lettered upstream. Entries stay unacked until the step that trained them is
checkpointed, so a restarted learner replays them from its pending list.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import redis

from asyncopd import phases, state, streams
from asyncopd.streams import Message, ScoredEntry

log = logging.getLogger(__name__)


class BatchAssembler:
    def __init__(self, r: redis.Redis, consumer: str, job_id: str, expected: int, read_count: int,
                 max_deliveries: int) -> None:
        self.r, self.job_id, self.expected, self.read_count = r, job_id, expected, read_count
        # A single learner consumer: reclaiming would steal its own buffered entries, so no XAUTOCLAIM.
        self.consumer = streams.StreamConsumer(r, streams.SCORED, consumer, max_deliveries=max_deliveries,
                                               reclaim_idle_ms=None)
        self.buffer: dict[int, dict[str, tuple[Message, ScoredEntry]]] = defaultdict(dict)
        self.duplicates: list[str] = []  # redelivered copies of buffered samples: acked with their batch
        self.skipped: list[str] = []  # entries of other jobs or of batches already trained

    @phases.timed(phases.REDIS)
    def lost(self, batch: int) -> int:
        return int(self.r.hget(streams.lost_key(self.job_id), str(batch)) or 0)

    def complete(self, batch: int) -> bool:
        return len(self.buffer[batch]) + self.lost(batch) >= self.expected

    def poll(self, next_batch: int, block_ms: int) -> None:
        messages = self.consumer.read(self.read_count, block_ms)
        for msg, entry in self.consumer.decode(messages, ScoredEntry):
            if entry.job_id != self.job_id and state.is_active(self.r, entry.job_id):
                self.consumer.replay_pending()  # a newer job's sample: leave it for that job's assembler
            elif entry.job_id != self.job_id or entry.batch < next_batch:
                self.skipped.append(msg.id)
            elif entry.sample_id in self.buffer[entry.batch]:
                self.duplicates.append(msg.id)
            else:
                self.buffer[entry.batch][entry.sample_id] = (msg, entry)
        if self.skipped:
            self.consumer.ack(self.skipped)
            self.skipped = []

    def take(self, batch: int) -> list[tuple[Message, ScoredEntry]]:
        return sorted(self.buffer.pop(batch, {}).values(), key=lambda me: me[1].sample_id)

    def ack(self, ids: list[str]) -> None:
        self.consumer.ack(ids + self.duplicates)
        self.duplicates = []
