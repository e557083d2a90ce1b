"""Weight-version metrics shared by the processes that publish (learner) and follow (rollout)."""

from prometheus_client import Counter, Histogram

SYNC_FAILURES = Counter("asyncopd_weight_sync_failures_total", "Published weight versions a follower could not "
                        "load as written (then recovered from), by reason: missing, truncated, corrupt, checksum, "
                        "manifest, mismatch.", ["reason"])
RELOAD_SECONDS = Histogram("asyncopd_weight_reload_seconds", "Time to load a published policy version.")
PUBLISHED_BYTES = Counter("asyncopd_weight_published_bytes_total", "Bytes written to the shared volume by "
                          "weight publishes (full versions and deltas).")
SYNC_FALLBACKS = Counter("asyncopd_weight_sync_fallbacks_total", "Versions a follower of the nccl transport loaded "
                         "from the fallback transport instead of receiving them, by reason: unanswered (no round "
                         "within weights_transfer_join_s), superseded (the learner holds a newer version), backend, "
                         "aborted, failed (the round failed).", ["reason"])
TRANSFER_ROUNDS = Counter("asyncopd_weight_transfer_rounds_total", "Weight-transfer rounds the learner served, by "
                          "result (ok, failed).", ["result"])
TRANSFER_SECONDS = Histogram("asyncopd_weight_transfer_seconds", "One successful weight-transfer round: group "
                             "formation, broadcast and the followers' reload.")
# At zero from start-up, every label value (dashboards plot increase() per label; an absent series is "no data").
for _reason in ("unanswered", "superseded", "backend", "aborted", "failed"):
    SYNC_FALLBACKS.labels(_reason)
for _result in ("ok", "failed"):
    TRANSFER_ROUNDS.labels(_result)
