"""What every service process runs besides its work loop: gRPC with health and reflection, Prometheus
metrics, heartbeats into the registry, and a SIGTERM that drains instead of killing work in flight."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from asyncopd import state
from asyncopd.settings import ServiceSettings
from asyncopd.v1 import common_pb2

log = logging.getLogger(__name__)


class ServiceRuntime:
    def __init__(self, service: str, grpc_name: str, settings: ServiceSettings) -> None:
        self.service, self.grpc_name, self.settings = service, grpc_name, settings
        self.redis = state.connect(settings.redis_url, settings.redis_password)
        self.stop = threading.Event()  # set on SIGTERM: finish what is held, take nothing new, exit
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.grpc_port = 0
        self.metrics_port = 0
        self.info: dict = {"job_id": "", "model_loaded": False, "policy_version": 0, "processed": 0}

    def start(self, add_servicer, *, handle_signals: bool = True) -> None:
        add_servicer(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.grpc_reflection:
            names = (self.grpc_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                     reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self.grpc_port = self.server.add_insecure_port(f"0.0.0.0:{self.settings.grpc_port}")
        self.server.start()
        server, _ = start_http_server(self.settings.metrics_port)
        self.metrics_port = server.server_port
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.set_model_loaded(False)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop.set())
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        log.info("%s %s: grpc :%d metrics :%d", self.service, self.settings.instance, self.grpc_port,
                 self.metrics_port)

    def set_model_loaded(self, loaded: bool, job_id: str = "") -> None:
        self.info["model_loaded"], self.info["job_id"] = loaded, job_id if loaded else ""
        status = health_pb2.HealthCheckResponse.SERVING if loaded else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(self.grpc_name, status)

    def status(self) -> common_pb2.ServiceStatus:
        return common_pb2.ServiceStatus(
            service=self.service, instance=self.settings.instance, job_id=self.info["job_id"],
            model_loaded=self.info["model_loaded"], policy_version=self.info["policy_version"],
            draining=self.stop.is_set(), processed=self.info["processed"],
        )

    def beat(self) -> None:
        state.heartbeat(self.redis, self.service, self.settings.instance, self.settings.heartbeat_ttl_s,
                        grpc_port=self.grpc_port, metrics_port=self.metrics_port, draining=self.stop.is_set(),
                        pid=os.getpid(),
                        **self.info)

    def _heartbeat_loop(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # Redis briefly away: the next beat retries; the TTL covers the gap.
                log.exception("heartbeat failed")
            if self.stop.wait(self.settings.heartbeat_ttl_s / 3):
                break

    def shutdown(self) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=2).wait()
        self.redis.delete(state.service_key(self.service, self.settings.instance))


class ControlServicer:
    """GetStatus and Drain, which every data-path service offers the same way."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime

    def GetStatus(self, request, context):  # noqa: N802 (gRPC method names)
        return self.runtime.status()

    def Drain(self, request, context):  # noqa: N802
        if request.drain:
            self.runtime.stop.set()
        return common_pb2.DrainResponse(status=self.runtime.status())
