from prometheus_client import Counter, Gauge, Histogram

STALENESS = Histogram("asyncopd_sample_staleness", "Policy versions between generation and training.",
                      buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
DROPPED_STALE = Counter("asyncopd_samples_dropped_stale_total", "Samples over the staleness budget, not trained.")
TRAINED = Counter("asyncopd_samples_trained_total", "Samples trained on.")
STEP_SECONDS = Histogram("asyncopd_learner_step_seconds", "Forward + backward + optimizer step.")
WAIT_SECONDS = Histogram("asyncopd_learner_wait_seconds", "Time waiting for a batch to be complete.")
PUBLISH_SECONDS = Histogram("asyncopd_weight_publish_seconds", "Time to write and announce a policy version (on "
                            "rank 0's background writer with weights_async_publish; a step waits only for its "
                            "snapshot, publish_s in the step records).")
LOSS = Gauge("asyncopd_learner_loss", "Objective value of the last step (token mean).")
KL = Gauge("asyncopd_learner_kl", "Sampled KL(behaviour policy || teacher) of the last batch, token mean: the policy "
           "that generated the batch, not the trained one.")
VERSION = Gauge("asyncopd_policy_version", "Policy version last published.")
STEP = Gauge("asyncopd_job_step", "Steps completed in the active job.")
OBJECTIVE = Gauge("asyncopd_learner_objective", "Objective diagnostics of the last step (KL estimate, "
                  "importance-ratio mean/max, fraction clipped, student entropy, leaked mass).", ["metric"])
EVAL = Gauge("asyncopd_learner_eval", "Held-out evaluation of the last evaluated version.", ["metric"])
DUPLICATES = Counter("asyncopd_samples_duplicate_total", "Samples that reached the learner more than once (a worker "
                     "resumed after its entries were reclaimed made them again): wasted work, never trained twice.")
