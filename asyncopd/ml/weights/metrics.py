"""Weight-version metrics shared by the processes that publish (learner) and follow (rollout)."""

from prometheus_client import Counter, Histogram

SYNC_FAILURES = Counter("asyncopd_weight_sync_failures_total", "Published weight versions a follower could not "
                        "load as written (then recovered from), by reason: missing, truncated, corrupt, checksum, "
                        "manifest, mismatch.", ["reason"])
RELOAD_SECONDS = Histogram("asyncopd_weight_reload_seconds", "Time to load a published policy version.")
PUBLISHED_BYTES = Counter("asyncopd_weight_published_bytes_total", "Bytes written to the shared volume by "
                          "weight publishes (full versions and deltas).")
