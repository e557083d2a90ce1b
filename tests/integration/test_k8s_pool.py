"""The Kubernetes rollout-pool backend against a local fake of the Kubernetes API's scale endpoints.

`FakeKubeAPI` is THE ONLY MOCK IN THE PROJECT (no API server can run on these machines: no kind, k3s or
envtest). It is a real HTTP server on 127.0.0.1 serving exactly the two calls the backend makes —
GET and PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale — with the real API server's behaviour
that matters here: bearer-token check (401), per-Deployment authorization (403), unknown Deployment (404),
merge-patch content type on PATCH (415), `autoscaling/v1` Scale bodies and `Status` error bodies. Anything
else it answers 404, so a new call the backend starts making fails these tests instead of passing silently.

The backend is tested on its own and inside a real coordinator process (`ASYNCOPD_POOL_BACKEND=kubernetes`)
whose `PUT /v1/pools/rollout` and `GET /v1/pools` go through it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import certifi
import httpx
import pytest

from asyncopd.ports import free_port
from services.coordinator.pools import PoolError
from services.coordinator.pools.kubernetes import KubernetesPool
from tests.helpers import ROOT, wait_until_ready

NS, DEPLOY = "asyncopd", "asyncopd-rollout"
SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")


class FakeKubeAPI:
    """Deployments' scale subresources, a valid token and the Deployments that token may scale."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.replicas: dict[tuple[str, str], int] = {(NS, DEPLOY): 2}
        self.allowed: set[tuple[str, str]] = {(NS, DEPLOY)}
        self.requests: list[dict] = []
        self.port = free_port()
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                fake.handle(self, "GET")

            def do_PATCH(self):  # noqa: N802
                fake.handle(self, "PATCH")

            def do_PUT(self):  # noqa: N802
                fake.handle(self, "PUT")

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Close the port: the next call gets connection refused."""
        self.server.shutdown()
        self.server.server_close()

    # -- the API -------------------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.requests.append({"method": method, "path": h.path, "auth": h.headers.get("Authorization"),
                              "content_type": h.headers.get("Content-Type"), "body": body})
        m = SCALE_PATH.match(h.path)
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.status(h, 401, "Unauthorized", "Unauthorized")
        if m is None or method not in ("GET", "PATCH"):
            return self.status(h, 404, "NotFound", "the server could not find the requested resource")
        key = (m.group(1), m.group(2))
        verb = method.lower()
        if key not in self.allowed:
            return self.status(h, 403, "Forbidden",
                               f'deployments.apps "{key[1]}" is forbidden: User "system:serviceaccount:{NS}:'
                               f'asyncopd-coordinator" cannot {verb} resource "deployments/scale" in API group '
                               f'"apps" in the namespace "{key[0]}"')
        if key not in self.replicas:
            return self.status(h, 404, "NotFound", f'deployments.apps "{key[1]}" not found')
        if method == "PATCH":
            if h.headers.get("Content-Type") != "application/merge-patch+json":
                return self.status(h, 415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format: {h.headers.get('Content-Type')}")
            try:
                replicas = json.loads(body)["spec"]["replicas"]
            except (ValueError, KeyError, TypeError):
                return self.status(h, 400, "BadRequest", "invalid patch")
            if not isinstance(replicas, int) or replicas < 0:
                return self.status(h, 422, "Invalid", "spec.replicas: Invalid value: must be >= 0")
            self.replicas[key] = replicas
        self.send(h, 200, {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": key[1], "namespace": key[0]},
            "spec": {"replicas": self.replicas[key]},
            "status": {"replicas": self.replicas[key], "selector": "app.kubernetes.io/component=rollout"},
        })

    def status(self, h, code: int, reason: str, message: str) -> None:
        self.send(h, code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code})

    @staticmethod
    def send(h, code: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("sa-token-1\n")
    return path


@pytest.fixture
def kube(token_file):
    fake = FakeKubeAPI(token_file.read_text().strip())
    yield fake
    fake.stop()


def pool_for(kube: FakeKubeAPI, token_file, deployment: str = DEPLOY) -> KubernetesPool:
    return KubernetesPool(NS, deployment, api_url=kube.url, token_file=token_file, timeout_s=5)


# -- the backend on its own ----------------------------------------------------------------------------------


def test_reads_and_patches_the_scale_subresource_with_the_bearer_token(kube, token_file):
    pool = pool_for(kube, token_file)
    assert pool.desired() == 2
    assert pool.scale(5) == 5
    assert kube.replicas[(NS, DEPLOY)] == 5 and pool.desired() == 5
    assert pool.scale(0) == 0  # zero is a valid size (an idle pool)
    get, patch = kube.requests[0], kube.requests[1]
    assert get["method"] == "GET" and patch["method"] == "PATCH"
    assert get["path"] == patch["path"] == f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOY}/scale"
    assert {r["auth"] for r in kube.requests} == {"Bearer sa-token-1"}
    assert patch["content_type"] == "application/merge-patch+json"
    assert json.loads(patch["body"]) == {"spec": {"replicas": 5}}
    pool.close()


def test_rotated_token_is_picked_up_without_a_restart(kube, token_file):
    pool = pool_for(kube, token_file)
    assert pool.desired() == 2
    kube.token = "sa-token-2"  # the API server now wants the new token; the kubelet writes it to the file
    with pytest.raises(PoolError) as err:
        pool.desired()
    assert err.value.status_code == 502 and "401" in str(err.value) and "token" in str(err.value)
    token_file.write_text("sa-token-2")
    assert pool.scale(3) == 3


@pytest.mark.parametrize("case,status,needles", [
    ("forbidden", 502, ["403", "may not patch deployments/scale", "Role", "cannot patch resource"]),
    ("missing", 502, ["404", f"Deployment {NS}/gone not found", "ASYNCOPD_K8S_ROLLOUT_DEPLOYMENT"]),
    ("refused", 503, ["unreachable", "127.0.0.1"]),
])
def test_api_errors_become_pool_errors_that_say_what_to_fix(kube, token_file, case, status, needles):
    deployment = {"forbidden": "other", "missing": "gone", "refused": DEPLOY}[case]
    if case == "forbidden":
        kube.replicas[(NS, "other")] = 1
    if case == "missing":
        kube.allowed.add((NS, "gone"))
    pool = pool_for(kube, token_file, deployment)
    if case == "refused":
        kube.stop()
        kube.stop = lambda: None  # already closed: the fixture's teardown has nothing to do
    with pytest.raises(PoolError) as err:
        pool.scale(4)
    assert err.value.status_code == status
    for needle in needles:
        assert needle in str(err.value), err.value


def test_misconfiguration_fails_at_start_with_the_setting_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("ASYNCOPD_K8S_API_URL", raising=False)
    with pytest.raises(ValueError, match="ASYNCOPD_K8S_API_URL"):
        KubernetesPool(NS, DEPLOY, token_file=tmp_path / "token")
    with pytest.raises(ValueError, match="ASYNCOPD_K8S_TOKEN_FILE"):
        KubernetesPool(NS, DEPLOY, api_url="http://127.0.0.1:1", token_file=tmp_path / "absent")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")  # in cluster (IPv6 service network), no SA mount
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (tmp_path / "token").write_text("t")
    with pytest.raises(ValueError, match="ASYNCOPD_K8S_CA_FILE"):
        KubernetesPool(NS, DEPLOY, token_file=tmp_path / "token", ca_file=tmp_path / "no-ca.crt")
    pool = KubernetesPool(NS, DEPLOY, token_file=tmp_path / "token", ca_file=certifi.where())
    assert pool.url == f"https://[fd00::1]:443/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOY}/scale"


# -- the whole coordinator with ASYNCOPD_POOL_BACKEND=kubernetes ---------------------------------------------


@pytest.fixture
def coordinator(redis_server, r, kube, token_file, tmp_path):
    port = free_port()
    env = {**os.environ, "ASYNCOPD_REDIS_URL": redis_server, "ASYNCOPD_HTTP_PORT": str(port),
           "ASYNCOPD_DATA_DIR": str(tmp_path / "data"), "ASYNCOPD_LOG_DIR": str(tmp_path / "logs"),
           "ASYNCOPD_POOL_BACKEND": "kubernetes", "ASYNCOPD_K8S_API_URL": kube.url,
           "ASYNCOPD_K8S_TOKEN_FILE": str(token_file), "ASYNCOPD_K8S_NAMESPACE": NS,
           "ASYNCOPD_K8S_ROLLOUT_DEPLOYMENT": DEPLOY}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    log = open(tmp_path / "coordinator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, proc, tmp_path / "coordinator.log")
    yield url, tmp_path / "coordinator.log"
    proc.terminate()
    proc.wait(30)
    log.close()


def test_coordinator_scales_the_rollout_deployment_through_the_api(coordinator, kube):
    api, log = coordinator
    assert httpx.get(f"{api}/v1/pools").json()["rollout"]["desired"] == 2
    resp = httpx.put(f"{api}/v1/pools/rollout", json={"replicas": 4})
    assert resp.status_code == 200 and resp.json() == {"replicas": 4}
    assert kube.replicas[(NS, DEPLOY)] == 4
    assert httpx.get(f"{api}/v1/pools").json()["rollout"]["desired"] == 4
    patches = [r for r in kube.requests if r["method"] == "PATCH"]
    assert len(patches) == 1 and json.loads(patches[0]["body"]) == {"spec": {"replicas": 4}}
    # Invalid input never reaches the API server.
    assert httpx.put(f"{api}/v1/pools/rollout", json={"replicas": -1}).status_code == 422
    assert len([r for r in kube.requests if r["method"] == "PATCH"]) == 1

    # The API server refusing: a clear 502 naming the cause, never a 500 with a stack trace.
    kube.allowed.clear()
    resp = httpx.put(f"{api}/v1/pools/rollout", json={"replicas": 1})
    assert resp.status_code == 502, resp.text
    assert "403" in resp.json()["detail"] and "Role" in resp.json()["detail"]
    pools = httpx.get(f"{api}/v1/pools")  # still answers: heartbeats do not depend on the API server
    assert pools.status_code == 200 and pools.json()["rollout"]["desired"] is None
    assert "403" in pools.json()["rollout"]["desired_error"]

    kube.allowed.add((NS, DEPLOY))
    del kube.replicas[(NS, DEPLOY)]
    resp = httpx.put(f"{api}/v1/pools/rollout", json={"replicas": 1})
    assert resp.status_code == 502 and f"Deployment {NS}/{DEPLOY} not found" in resp.json()["detail"]

    kube.stop()
    resp = httpx.put(f"{api}/v1/pools/rollout", json={"replicas": 1})
    assert resp.status_code == 503 and "unreachable" in resp.json()["detail"], resp.text
    kube.replicas[(NS, DEPLOY)] = 4
    kube.start()  # the API server back: scaling works again without a coordinator restart
    assert httpx.put(f"{api}/v1/pools/rollout", json={"replicas": 2}).json() == {"replicas": 2}
    assert "Traceback" not in log.read_text()
