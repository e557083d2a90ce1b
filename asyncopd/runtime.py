"""What every service process runs besides its work loop: gRPC with health and reflection, Prometheus
metrics, heartbeats into the registry, and a SIGTERM that drains instead of killing work in flight."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import socket
import threading
import time
from concurrent import futures
from urllib.parse import urlsplit

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from asyncopd import state
from asyncopd.records import Heartbeat
from asyncopd.settings import ServiceSettings
from asyncopd.v1 import common_pb2

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InstanceInfo:
    """What this process's work loop reports about itself (heartbeat, GetStatus)."""

    job_id: str = ""
    model_loaded: bool = False
    ready: bool = False
    policy_version: int = 0
    processed: int = 0  # samples generated, scored or trained


class ServiceRuntime:
    def __init__(self, service: str, grpc_name: str, settings: ServiceSettings) -> None:
        self.service, self.grpc_name, self.settings = service, grpc_name, settings
        self.redis = state.connect(settings.redis_url, settings.redis_password, settings.redis_outage_s)
        self._require_redis()
        # Heartbeats and readiness probes must answer at once, not ride out an outage like the work does.
        self.probe = state.connect(settings.redis_url, settings.redis_password)
        self.stop = threading.Event()  # set on SIGTERM: finish what is held, take nothing new, exit
        self.heartbeats: threading.Thread | None = None
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.grpc_port = 0
        self.metrics_port = 0
        # Where `asyncopd status --services` / `drain` reach the gRPC port: the pod IP in Kubernetes (pod names
        # do not resolve), else the hostname (callers on this host use loopback).
        self.host = settings.pod_ip or socket.gethostname()
        self.info = InstanceInfo()

    def _require_redis(self) -> None:
        """A Redis that never answers at start-up is a wrong URL, password or network policy, not an outage:
        exit with the reason (a pod that crash-loops shows it as its last line); once up, outages are ridden
        out (`redis_outage_s`)."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            where = urlsplit(self.settings.redis_url)
            url = f"{where.scheme}://{where.hostname}:{where.port or 6379}{where.path}"  # never the password
            reason = (f"{self.service}: Redis at {url} did not answer within {self.settings.redis_outage_s:.0f} s "
                      f"of start-up ({type(exc).__name__}: {exc}); check ASYNCOPD_REDIS_URL, "
                      "ASYNCOPD_REDIS_PASSWORD and that Redis runs and is reachable from here")
            log.error("%s", reason)
            raise SystemExit(reason) from None

    def start(self, add_servicer, *, handle_signals: bool = True) -> None:
        """`add_servicer`: the generated `add_<Name>Servicer_to_server` of this service's proto (`grpc_name`);
        it serves the RPCs that service declares from one `ControlServicer`."""
        add_servicer(ControlServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.grpc_reflection:
            names = (self.grpc_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                     reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        host = self.settings.grpc_host
        self.grpc_port = self.server.add_insecure_port(f"[{host}]:{self.settings.grpc_port}" if ":" in host
                                                       else f"{host}:{self.settings.grpc_port}")
        self.server.start()
        server, _ = start_http_server(self.settings.metrics_port, addr=self.settings.metrics_host)
        self.metrics_port = server.server_port
        self.health.set("", SERVING)
        self.set_model_loaded(False)
        if handle_signals:
            self.handle_signals()
        self.heartbeats = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
        self.heartbeats.start()
        log.info("%s %s: grpc %s:%d metrics %s:%d", self.service, self.settings.instance, self.settings.grpc_host,
                 self.grpc_port, self.settings.metrics_host, self.metrics_port)

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT drain (set `stop`) instead of killing work in flight; a process with a long start
        calls this early, so a signal during start-up is a drain too."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def set_ready(self, ready: bool) -> None:
        """The per-service health name (what readiness probes ask): SERVING once this process can do its work."""
        self.info.ready = ready
        self.health.set(self.grpc_name, SERVING if ready else NOT_SERVING)

    def set_model_loaded(self, loaded: bool, job_id: str = "") -> None:
        """Data-path services (rollout, teacher, learner) are ready exactly while a job's model is loaded."""
        self.info.model_loaded, self.info.job_id = loaded, job_id if loaded else ""
        self.set_ready(loaded)

    def status(self) -> common_pb2.ServiceStatus:
        return common_pb2.ServiceStatus(
            service=self.service, instance=self.settings.instance, job_id=self.info.job_id,
            model_loaded=self.info.model_loaded, policy_version=self.info.policy_version,
            draining=self.stop.is_set(), processed=self.info.processed, ready=self.info.ready,
        )

    def beat(self) -> None:
        beat = Heartbeat(service=self.service, instance=self.settings.instance, seen=time.time(), pid=os.getpid(),
                         host=self.host, grpc_port=self.grpc_port, metrics_port=self.metrics_port,
                         draining=self.stop.is_set(), **dataclasses.asdict(self.info))
        state.heartbeat(self.probe, beat, self.settings.heartbeat_ttl_s)

    def _heartbeat_loop(self) -> None:
        stopping = False
        while True:
            period = self.settings.heartbeat_ttl_s / 3
            try:
                self.beat()  # once more after a stop, so the registry shows the instance draining at once
                self.health.set(self.grpc_name, SERVING if self.info.ready else NOT_SERVING)
            except Exception as exc:  # Redis away: not ready (no progress possible) until a beat lands again
                log.warning("heartbeat failed, not ready until Redis answers: %s", exc)
                self.health.set(self.grpc_name, NOT_SERVING)
                period = min(period, 0.5)  # back in the registry within half a second of Redis
            if stopping:
                break
            stopping = self.stop.wait(period)

    def shutdown(self) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=2).wait()
        self.stop.set()
        if self.heartbeats is not None:
            self.heartbeats.join(timeout=5)  # its last beat must not re-register what the delete removes
        self.redis.delete(state.service_key(self.service, self.settings.instance))


def bearer_ok(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode(), f"Bearer {token}".encode())


class ControlServicer:
    """GetStatus and Drain, the same on every service. Registered under the service's own gRPC name
    (`add_servicer`); the coordinator's service declares no Drain, so there it is never reached."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime

    def authorized(self, context) -> bool:
        """Calls that change state need the token when one is configured (ASYNCOPD_GRPC_TOKEN)."""
        token = self.runtime.settings.grpc_token
        if not token:
            return True
        given = dict(context.invocation_metadata()).get("authorization", "")
        return bearer_ok(given, token)

    def GetStatus(self, request, context):  # noqa: N802 (gRPC method names)
        return self.runtime.status()

    def Drain(self, request, context):  # noqa: N802
        if not self.authorized(context):
            log.warning("drain refused: %s sent no or a wrong token", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Drain needs `authorization: Bearer <token>` metadata "
                          "with the services' ASYNCOPD_GRPC_TOKEN")
        # What SIGTERM does: the work loop finishes and acks what it holds, takes nothing new, and the process
        # exits (the heartbeat loop stops and `shutdown` removes the registry entry).
        log.info("drain requested by %s", context.peer())
        self.runtime.stop.set()
        return common_pb2.DrainResponse(status=self.runtime.status())
