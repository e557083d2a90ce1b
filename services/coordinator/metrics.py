from prometheus_client import Counter, Gauge

from asyncopd import streams
from asyncopd.records import JOB_STATES

RELEASED = Counter("asyncopd_prompts_released_total", "Prompts released to the rollout pool.")
STREAM_LENGTH = Gauge("asyncopd_stream_length_entries", "Entries in a stream.", ["stream"])
STREAM_PENDING = Gauge("asyncopd_stream_pending_entries", "Entries delivered but not acked.", ["stream"])
JOBS = Gauge("asyncopd_jobs", "Jobs by state.", ["state"])
# Every labelled series exists at zero from start-up, so dashboards and alerts see 0, not "no data".
for _state in JOB_STATES:
    JOBS.labels(_state)
for _stream in streams.DATA_STREAMS:
    STREAM_LENGTH.labels(_stream)
    STREAM_PENDING.labels(_stream)
STREAM_LENGTH.labels(streams.DEAD_LETTER)
