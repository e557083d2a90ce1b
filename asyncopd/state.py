"""Job state shared through Redis: the active job, policy versions, events and the service registry.

The coordinator owns job records; services only read the active job, publish versions (learner), report
events (failure, completion) and heartbeat. Keys are listed here and nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from asyncopd.jobspec import JobSpec
from asyncopd.records import Heartbeat, JobEvent, VersionEvent, event_fields

log = logging.getLogger(__name__)

ACTIVE = "asyncopd:active"
EVENTS = "asyncopd:events"
JOBS = "asyncopd:jobs"
QUEUE = "asyncopd:queue"


def job_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}"


def version_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:version"


def steps_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:steps"


def evals_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:evals"


def progress_key(job_id: str) -> str:
    """The job's running totals (`records.Progress`), written with each step record."""
    return f"asyncopd:job:{job_id}:progress"


def service_key(service: str, instance: str) -> str:
    return f"asyncopd:svc:{service}:{instance}"


def connect(url: str, password: str | None = None, outage_s: float = 0.0) -> redis.Redis:
    """A client; with `outage_s`, each command rides out that long an unreachable Redis (a restart, a failover),
    retrying with exponential backoff (50 ms doubling to 2 s), before it raises (a Redis still loading its
    append-only file after a restart counts as unreachable). Services set it; the CLI and
    tools do not (they should say at once that Redis is not there)."""
    kwargs: dict = {"password": password} if password else {}
    if outage_s > 0:
        backoff = ExponentialBackoff(cap=2.0, base=0.05)
        retries, waited = 0, 0.0
        while waited < outage_s:
            retries += 1
            waited += min(2.0, 0.05 * 2**retries)
        unreachable = [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]
        kwargs.update(retry=Retry(backoff, retries), retry_on_error=unreachable,
                      socket_connect_timeout=2, socket_keepalive=True, health_check_interval=15)
    return redis.Redis.from_url(url, decode_responses=True, **kwargs)


@dataclass(frozen=True)
class ActiveJob:
    id: str
    spec: JobSpec
    output_dir: str


def active_job(r: redis.Redis, known: ActiveJob | None = None) -> ActiveJob | None:
    """The running job. `known` comes back as is while it is still the active one: one round trip, since the
    coordinator sets ACTIVE only for a running job and clears it in the transaction that ends the job."""
    job_id = r.get(ACTIVE)
    if not job_id:
        return None
    if known is not None and known.id == job_id:
        return known
    record = r.hmget(job_key(job_id), "spec", "output_dir", "state")
    if not record[0] or record[2] != "running":
        return None
    return ActiveJob(job_id, JobSpec.model_validate_json(record[0]), record[1])


def is_active(r: redis.Redis, job_id: str) -> bool:
    return r.get(ACTIVE) == job_id


def policy_version(r: redis.Redis, job_id: str) -> int:
    return int(r.get(version_key(job_id)) or 0)


def head_path_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:head-path"


def lineage_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:lineage"


def new_lineage(r: redis.Redis, job_id: str) -> int:
    """A number for a learner (re)starting this job: 1 for the first start, then 2, 3, ..."""
    return int(r.incr(f"asyncopd:job:{job_id}:lineages"))


def publish_version(r: redis.Redis, job_id: str, version: int, path: str, lineage: int) -> None:
    """Make (lineage, version) visible at once: the path, the number rollouts and the coordinator watch, and
    the learner lineage that produced it (a restarted learner starts a new lineage from its checkpoint). A
    `version` event wakes the coordinator, whose admission control releases the batches it admits."""
    pipe = r.pipeline(transaction=True)
    pipe.set(head_path_key(job_id), path)
    pipe.set(version_key(job_id), version)
    pipe.set(lineage_key(job_id), lineage)
    add_event(pipe, VersionEvent(job_id=job_id, service="learner", version=version))
    pipe.execute()


def policy_head(r: redis.Redis, job_id: str) -> tuple[int, int, str | None]:
    """(lineage, version, weights path) of the newest published weights, in one round trip; (0, 0, None)
    before the first publish."""
    version, lineage, path = r.mget(version_key(job_id), lineage_key(job_id), head_path_key(job_id))
    return int(lineage or 0), int(version or 0), path


_APPEND_ONCE = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then redis.call('RPUSH', KEYS[1], ARGV[1]) end
if #ARGV > 1 then redis.call('HSET', KEYS[2], unpack(ARGV, 2)) end
"""


def append_record(r: redis.Redis, key: str, text: str, hash_key: str = "", mapping: dict | None = None) -> None:
    """Append a record to a list (and set `mapping` on `hash_key` in the same atomic step) once: a command
    retried after Redis applied it but lost the reply (it stopped mid-reply) must not append it twice. Records
    carry their time, so two real records are never equal. EVAL, not EVALSHA: the retry after a Redis restart
    meets an empty script cache."""
    pairs = [str(x) for kv in (mapping or {}).items() for x in kv]
    r.eval(_APPEND_ONCE, 2, key, hash_key, text, *pairs)


def add_event(r, event: JobEvent) -> None:
    """Report a job event (`records.JobEvent`); the coordinator acts on `failed` and `completed`. `r` may be a
    pipeline, so the event lands in the transaction that made it true."""
    r.xadd(EVENTS, event_fields(event), maxlen=10_000, approximate=True)


def heartbeat(r: redis.Redis, beat: Heartbeat, ttl_s: float) -> None:
    """Register (or refresh) a live instance; it disappears `ttl_s` after its last beat."""
    key = service_key(beat.service, beat.instance)
    pipe = r.pipeline()
    pipe.hset(key, mapping=beat.to_hash())
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.execute()


def live_services(r: redis.Redis, service: str | None = None) -> list[Heartbeat]:
    out = []
    # SCAN may return a key twice (while Redis rehashes), so the keys go through a set.
    for key in set(r.scan_iter(match=service_key(service or "*", "*"), count=200)):
        h = r.hgetall(key)
        if not h:
            continue
        try:
            out.append(Heartbeat.from_hash(h))
        except ValueError as exc:  # a heartbeat of another release: not ours to read, not fatal
            log.warning("ignoring heartbeat %s: %s", key, exc)
    return sorted(out, key=lambda s: (s.service, s.instance))
