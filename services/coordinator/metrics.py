from prometheus_client import Counter, Gauge, Histogram

from asyncopd import streams
from asyncopd.records import JOB_STATES

RELEASED = Counter("asyncopd_prompts_released_total", "Prompts released to the rollout pool.")
STREAM_LENGTH = Gauge("asyncopd_stream_length_entries", "Entries in a stream.", ["stream"])
STREAM_PENDING = Gauge("asyncopd_stream_pending_entries", "Entries delivered but not acked.", ["stream"])
JOBS = Gauge("asyncopd_jobs", "Jobs by state.", ["state"])
HTTP_SECONDS = Histogram("asyncopd_http_request_seconds", "REST requests: the coordinator's own time per request, "
                         "from the request reaching the app to its response's last byte, by method, route template "
                         "(/v1/jobs/{job_id}, never a raw path) and status code.", ["method", "route", "status"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
# Every labelled series exists at zero from start-up, so dashboards and alerts see 0, not "no data".
for _state in JOB_STATES:
    JOBS.labels(_state)
for _stream in streams.DATA_STREAMS:
    STREAM_LENGTH.labels(_stream)
    STREAM_PENDING.labels(_stream)
STREAM_LENGTH.labels(streams.DEAD_LETTER)
