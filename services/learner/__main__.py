"""Learner entrypoint: `python -m services.learner`, or `torchrun ... -m services.learner` for several ranks
(rank 0 serves gRPC/metrics and reads Redis; the other ranks follow it).

With several learner pods (`torchrun --nnodes N`, one StatefulSet pod per node) every pod carries the same
gRPC probes, but only pod 0 holds rank 0. On every other pod the process with LOCAL_RANK 0 serves a minimal
grpc.health.v1 server on ASYNCOPD_GRPC_PORT — service "" SERVING while the process lives (startup and
liveness), "asyncopd.v1.LearnerService" SERVING once it has joined the process group (readiness) — and a
metrics endpoint with process metrics only (no asyncopd_* series: the follower's copies would sit at zero
and skew averages of rank 0's loss and KL), so a PodMonitor finds every learner pod up.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("services.learner")

SERVICE_NAME = "asyncopd.v1.LearnerService"


class FollowerEndpoints:
    """Health (and process metrics) of a follower pod; what its probes and the PodMonitor talk to."""

    def __init__(self, grpc_port: int, metrics_port: int) -> None:
        from concurrent import futures

        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server

        self._serving = health_pb2.HealthCheckResponse.SERVING
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.grpc_port = self.server.add_insecure_port(f"0.0.0.0:{grpc_port}")
        self.server.start()
        self.health.set("", self._serving)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.metrics_server, _ = start_http_server(metrics_port, registry=registry)
        log.info("follower rank %s: grpc health :%d metrics :%d", os.environ.get("RANK"), self.grpc_port,
                 self.metrics_server.server_port)

    def joined(self) -> None:
        self.health.set(SERVICE_NAME, self._serving)

    def close(self) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=1).wait()
        self.metrics_server.shutdown()


def require_writable(data_dir) -> None:
    """Every rank writes checkpoints and weight versions under the data volume: without it (a read-only image
    root, a volume mounted read-only or owned by another user) say so now, not at the first job's checkpoint."""
    import tempfile

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=data_dir).close()
    except OSError as exc:
        reason = (f"learner: ASYNCOPD_DATA_DIR={data_dir} is not writable by uid {os.getuid()} ({exc.strerror}): "
                  "mount the shared data volume there (the chart's `persistence`), writable by this user")
        log.error("%s", reason)
        raise SystemExit(reason) from None


def main() -> None:
    from asyncopd.logs import adopt_library_loggers, setup_logging
    from services.learner.settings import LearnerSettings

    settings = LearnerSettings()
    setup_logging(settings.log_level, "learner", settings.instance, settings.log_format)
    require_writable(settings.data_dir)

    # Before joining: the rendezvous may wait for slow pods, and the probes must pass meanwhile.
    endpoints = None
    if os.environ.get("RANK", "0") != "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        endpoints = FollowerEndpoints(settings.grpc_port, settings.metrics_port)

    runtime = None
    if os.environ.get("RANK", "0") == "0":
        from asyncopd.runtime import ServiceRuntime

        runtime = ServiceRuntime("learner", SERVICE_NAME, settings)
        runtime.handle_signals()  # a SIGTERM while the group forms and the modules load drains, not kills

    import torch.distributed as dist

    from services.learner.distributed import init_distributed
    from services.learner.ranks import RankDriver, follow

    init_distributed(settings)
    import transformers  # noqa: F401  (now, not at the first job: its console handler is rerouted below)

    adopt_library_loggers()  # torch, DeepSpeed and transformers log through the root handler from here on
    if dist.get_rank() != 0:
        import signal

        # torchrun forwards SIGTERM to every rank; followers leave when rank 0 says so, mid-collective never.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if endpoints is not None:
            endpoints.joined()
        try:
            follow(settings)
        finally:
            if endpoints is not None:
                endpoints.close()
        return

    from asyncopd.v1 import learner_pb2_grpc
    from services.learner.service import Learner

    assert runtime is not None, "rank 0 without RANK=0 in its environment"
    learner = Learner(settings, runtime, RankDriver(settings))
    runtime.start(learner_pb2_grpc.add_LearnerServiceServicer_to_server)
    try:
        learner.run()
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
