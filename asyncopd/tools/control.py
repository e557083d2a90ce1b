"""`asyncopd status --services` and `asyncopd drain`: the callers of the gRPC control plane.

The instances come from the heartbeat registry in Redis (`state.live_services`): each heartbeat advertises the
host and gRPC port where its GetStatus and Drain answer. Every call has a deadline; an instance that does not
answer is named with the reason and makes the command exit non-zero, never with a traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable

import grpc
import redis

from asyncopd import state
from asyncopd.client import env_token
from asyncopd.records import Heartbeat
from asyncopd.v1 import common_pb2, coordinator_pb2_grpc, learner_pb2_grpc, rollout_pb2_grpc, teacher_pb2_grpc

DEADLINE_S = 5.0
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
STUBS = {
    "rollout": rollout_pb2_grpc.RolloutServiceStub,
    "teacher": teacher_pb2_grpc.TeacherServiceStub,
    "learner": learner_pb2_grpc.LearnerServiceStub,
    "coordinator": coordinator_pb2_grpc.CoordinatorServiceStub,
}
DRAINABLE = ("rollout", "teacher", "learner")  # the data-path services; the coordinator holds no entries


class ControlError(Exception):
    """A failure the operator can act on; the message says what failed and where."""


def run(command: Callable[[object], int], args) -> None:
    """Run a control command for the CLI: its exit status, or its error as one line on stderr."""
    try:
        code = command(args)
    except ControlError as exc:
        sys.exit(f"error: {exc}")
    if code:
        sys.exit(code)


# -- the registry -----------------------------------------------------------------------------------------


def redis_url(args) -> str:
    """--redis-url, else ASYNCOPD_REDIS_URL, else the local stack's (`asyncopd up`), else the default."""
    from asyncopd.tools import localstack

    return localstack.address(getattr(args, "redis_url", None), "ASYNCOPD_REDIS_URL", "redis_url", DEFAULT_REDIS_URL,
                              args.run_dir)


def connect(url: str) -> redis.Redis:
    # Not state.connect: a command must fail within its deadline when Redis is away, not hang on a socket.
    password = os.environ.get("ASYNCOPD_REDIS_PASSWORD")
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=DEADLINE_S,
                                socket_timeout=DEADLINE_S, **({"password": password} if password else {}))


def live_instances(url: str) -> list[Heartbeat]:
    r = connect(url)
    try:
        return state.live_services(r)
    except redis.RedisError as exc:
        raise ControlError(f"cannot read the service registry from Redis at {url}: {exc} "
                           "(set --redis-url or ASYNCOPD_REDIS_URL)") from None
    finally:
        r.close()


def address(instance: Heartbeat) -> str:
    """host:port of an instance's gRPC server; loopback for the ones on this host."""
    host = instance.host or "127.0.0.1"
    if host == socket.gethostname():
        host = "127.0.0.1"
    return f"[{host}]:{instance.grpc_port}" if ":" in host else f"{host}:{instance.grpc_port}"


def name(instance: Heartbeat) -> str:
    return f"{instance.service}/{instance.instance}"


# -- the calls --------------------------------------------------------------------------------------------


def call(instance: Heartbeat, method: str, timeout_s: float = DEADLINE_S) -> common_pb2.ServiceStatus:
    """GetStatus or Drain on one instance; a ControlError saying why when it does not answer."""
    stub_class = STUBS.get(instance.service)
    if stub_class is None:
        raise ControlError(f"{name(instance)}: unknown service {instance.service!r}")
    addr = address(instance)
    with grpc.insecure_channel(addr) as channel:
        stub = stub_class(channel)
        try:
            if method == "Drain":
                return stub.Drain(common_pb2.DrainRequest(), timeout=timeout_s, metadata=auth_metadata()).status
            return stub.GetStatus(common_pb2.GetStatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ControlError(f"{name(instance)} at {addr}: {why(exc, timeout_s)}") from None


def auth_metadata() -> tuple[tuple[str, str], ...]:
    """The services' gRPC token (ASYNCOPD_GRPC_TOKEN, or the file ASYNCOPD_GRPC_TOKEN_FILE) for calls that
    change state; none when unset."""
    try:
        token = env_token("ASYNCOPD_GRPC_TOKEN")
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    return (("authorization", f"Bearer {token}"),) if token else ()


def why(exc: grpc.RpcError, timeout_s: float) -> str:
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ("refused: the services require a token for Drain (set ASYNCOPD_GRPC_TOKEN or "
                "ASYNCOPD_GRPC_TOKEN_FILE to their ASYNCOPD_GRPC_TOKEN)")
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"unreachable ({exc.details()}); a process that died stays registered until its heartbeat "
                "expires")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout_s:g} s"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "does not implement this RPC (a different asyncopd version?)"
    return f"{code.name}: {exc.details()}"


# -- the commands -----------------------------------------------------------------------------------------

COLUMNS = ("SERVICE", "INSTANCE", "ADDRESS", "JOB", "MODEL", "VERSION", "PROCESSED", "STATE")


def row(instance: Heartbeat, status: common_pb2.ServiceStatus | None) -> tuple[str, ...]:
    if status is None:
        return (instance.service, instance.instance, address(instance), "-", "-", "-", "-", "NO ANSWER")
    state_ = "draining" if status.draining else "ready" if status.ready else "not ready"
    return (status.service, status.instance, address(instance), status.job_id or "-",
            "loaded" if status.model_loaded else "-", str(status.policy_version), str(status.processed), state_)


def print_table(rows: list[tuple[str, ...]]) -> None:
    rows = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1])


def status_services(args) -> int:
    """One line per live instance, from its own GetStatus; exit status 1 when any of them does not answer."""
    if getattr(args, "job", None):
        raise ControlError("--services lists the service instances; it takes no JOB")
    url = redis_url(args)
    instances = live_instances(url)
    if not instances:
        raise ControlError(f"no service instance is registered in Redis at {url} (is the stack up?)")
    rows, errors = [], []
    for instance in instances:
        try:
            rows.append(row(instance, call(instance, "GetStatus", args.timeout)))
        except ControlError as exc:
            rows.append(row(instance, None))
            errors.append(str(exc))
    print_table(rows)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def find(instances: list[Heartbeat], target: str) -> Heartbeat:
    """The instance `SERVICE/INSTANCE` or `INSTANCE` names."""
    service, _, instance = target.rpartition("/")
    if service and service not in STUBS:
        raise ControlError(f"{target!r}: unknown service {service!r} (one of {', '.join(STUBS)})")
    found = [i for i in instances if i.instance == instance and service in ("", i.service)]
    if not found:
        live = ", ".join(name(i) for i in instances) or "none"
        raise ControlError(f"no live instance {target!r} in the registry (live: {live})")
    if len(found) > 1:
        raise ControlError(f"{target!r} names several instances ({', '.join(name(i) for i in found)}); "
                           "say which with SERVICE/INSTANCE")
    return found[0]


def drain(args) -> int:
    """Drain one instance: it finishes and acks what it holds, takes nothing new, and exits."""
    url = redis_url(args)
    instance = find(live_instances(url), args.target)
    if instance.service not in DRAINABLE:
        raise ControlError(f"{name(instance)}: the coordinator has no Drain (it holds no stream entries); "
                           "stop it with `asyncopd down` or its Deployment")
    status = call(instance, "Drain", args.timeout)
    print(f"draining {name(instance)} at {address(instance)}: it finishes what it holds, then exits")
    print_table([row(instance, status)])
    if args.wait is None:
        return 0
    key = state.service_key(instance.service, instance.instance)
    r = connect(url)
    deadline = time.monotonic() + args.wait
    try:
        while r.exists(key):
            if time.monotonic() > deadline:
                raise ControlError(f"{name(instance)} is still registered {args.wait:g} s after Drain "
                                   "(still finishing its work? see its log)")
            time.sleep(0.2)
    except redis.RedisError as exc:
        raise ControlError(f"lost Redis at {url} while waiting for {name(instance)} to exit: {exc}") from None
    finally:
        r.close()
    print(f"{name(instance)} exited")
    return 0
