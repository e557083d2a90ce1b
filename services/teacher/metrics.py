from prometheus_client import Counter, Histogram

SCORE_SECONDS = Histogram("asyncopd_teacher_score_seconds", "Teacher engine time per scoring call.")
SAMPLES = Counter("asyncopd_teacher_samples_total", "Rollouts scored and written to the scored stream.")
