"""Who gets in: the REST token (and what stays open without it), the CLI's answers when it cannot get in, the
gRPC token on Drain, and loopback binding. Real coordinator processes, real gRPC servers, real Redis."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from pathlib import Path

import grpc
import httpx
import pytest

from asyncopd import state
from asyncopd.runtime import ServiceRuntime
from asyncopd.v1 import common_pb2, rollout_pb2_grpc
from tests.helpers import ROOT
from tests.integration.test_bad_input import start_coordinator

TOKEN = "t0ken-with-enough-entropy"
CLI = [str(ROOT / ".venv" / "bin" / "asyncopd")]


@pytest.fixture(scope="module")
def guarded(redis_server, tmp_path_factory):
    """A coordinator with ASYNCOPD_API_TOKEN, on its own Redis database (not the other tests' job queue)."""
    run = tmp_path_factory.mktemp("coord-token")
    proc, url = start_coordinator(redis_server.rsplit("/", 1)[0] + "/3", run, ASYNCOPD_API_TOKEN=TOKEN)
    yield url
    proc.terminate()
    proc.wait(30)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCOPD_API_TOKEN", "ASYNCOPD_GRPC_TOKEN"))}
    return subprocess.run([*CLI, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for needle in needles:
        assert needle in p.stderr, p.stderr


# -- REST: the token guards /v1/*; health, readiness and metrics stay open --------------------------------


def test_v1_needs_the_token_and_401s_say_how_to_authenticate(guarded):
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/pools"), ("POST", "/v1/jobs"),
                         ("PUT", "/v1/pools/rollout"), ("GET", "/v1/jobs/x-12345678"),
                         ("POST", "/v1/jobs/x-12345678/cancel")):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                        {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}):
            resp = httpx.request(method, guarded + path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in resp.text
    ok = httpx.get(f"{guarded}/v1/jobs", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_health_readiness_and_metrics_are_open(guarded):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(guarded + path).status_code == 200, path


def test_the_cli_reads_the_token_from_the_environment_or_a_file(guarded, tmp_path):
    assert_one_line_error(cli("--api", guarded, "status"), "error 401", "ASYNCOPD_API_TOKEN")
    assert cli("--api", guarded, "status", env={"ASYNCOPD_API_TOKEN": TOKEN}).returncode == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    p = cli("--api", guarded, "status", env={"ASYNCOPD_API_TOKEN_FILE": str(token_file)})
    assert p.returncode == 0, p.stderr
    assert_one_line_error(cli("--api", guarded, "status", env={"ASYNCOPD_API_TOKEN_FILE": str(tmp_path / "nope")}),
                          "ASYNCOPD_API_TOKEN_FILE", "cannot read the token")


def test_the_cli_says_what_to_do_when_the_coordinator_is_unreachable():
    from asyncopd.ports import free_port

    p = cli("--api", f"http://127.0.0.1:{free_port()}", "status")
    assert_one_line_error(p, "cannot reach the coordinator", "asyncopd up", "--api")
    p = cli("--api", f"http://127.0.0.1:{free_port()}", "scale", "rollout", "2")
    assert_one_line_error(p, "cannot reach the coordinator")


def test_the_cli_points_at_the_coordinators_log_on_a_5xx():
    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'{"detail": "internal error; the coordinator\'s log has the details"}'
            self.send_response(500)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = cli("--api", f"http://127.0.0.1:{server.server_port}", "status")
        assert_one_line_error(p, "error 500", "see its log")
    finally:
        server.shutdown()


# -- gRPC: Drain needs the token when one is set; everything binds loopback unless told otherwise ---------


@pytest.fixture
def rollout(service_runtime):
    names = iter(range(100))
    return lambda **settings: service_runtime("rollout", f"rollout-{next(names)}", **settings)


def drain(redis_url: str, rt: ServiceRuntime, **env: str) -> subprocess.CompletedProcess:
    return cli("drain", f"rollout/{rt.settings.instance}", "--redis-url", redis_url, env=env)


def test_drain_needs_the_grpc_token_when_one_is_set(rollout, redis_server):
    rt = rollout(grpc_token="grpc-s3cret")
    assert_one_line_error(drain(redis_server, rt), "refused", "ASYNCOPD_GRPC_TOKEN")
    assert_one_line_error(drain(redis_server, rt, ASYNCOPD_GRPC_TOKEN="wrong"), "refused")
    assert not rt.stop.is_set()
    with grpc.insecure_channel(f"127.0.0.1:{rt.grpc_port}") as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        assert stub.GetStatus(common_pb2.GetStatusRequest(), timeout=5).instance == rt.settings.instance  # open
        with pytest.raises(grpc.RpcError) as err:
            stub.Drain(common_pb2.DrainRequest(), timeout=5, metadata=(("authorization", "Bearer grpc-s3cre"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not rt.stop.is_set()
    p = drain(redis_server, rt, ASYNCOPD_GRPC_TOKEN="grpc-s3cret")
    assert p.returncode == 0, p.stderr
    assert rt.stop.is_set()


def test_drain_reads_the_grpc_token_from_a_file(rollout, redis_server, tmp_path):
    rt = rollout(grpc_token="from-a-file")
    (tmp_path / "grpc").write_text("from-a-file\n")
    assert drain(redis_server, rt, ASYNCOPD_GRPC_TOKEN_FILE=str(tmp_path / "grpc")).returncode == 0
    assert rt.stop.is_set()


def test_without_a_grpc_token_drain_stays_open_on_loopback(rollout, redis_server):
    rt = rollout()
    assert drain(redis_server, rt).returncode == 0 and rt.stop.is_set()


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
ANY = {"00000000", "00000000000000000000000000000000"}


def listening(port: int) -> str:
    """"loopback" or "any": where sockets listening on `port` are bound (from /proc/net/tcp{,6})."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state_ = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state_ == "0A" and int(hexport, 16) == port:
                out.add("loopback" if addr in LOOPBACK else "any" if addr in ANY else addr)
    assert len(out) == 1, out
    return out.pop()


def test_grpc_and_metrics_bind_loopback_by_default(rollout, r):
    rt = rollout()
    assert listening(rt.grpc_port) == listening(rt.metrics_port) == "loopback"
    (beat,) = state.live_services(r, "rollout")
    assert beat.grpc_port == rt.grpc_port
    wide = rollout(grpc_host="0.0.0.0", metrics_host="0.0.0.0")  # what the chart sets (with a NetworkPolicy)
    assert listening(wide.grpc_port) == listening(wide.metrics_port) == "any"
