"""Rollout pool backed by a Kubernetes Deployment's scale subresource.

Two endpoints only, so this speaks plain HTTPS (httpx) instead of pulling in the kubernetes client:

    GET   /apis/apps/v1/namespaces/NS/deployments/NAME/scale     desired replicas (spec.replicas)
    PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale     {"spec": {"replicas": N}}, merge patch

Credentials are the pod's service account (the chart binds it to a Role that allows exactly these verbs on
the rollout and teacher Deployments): API server `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`,
bearer token from the projected token file, re-read at every call because the kubelet rotates it, and the
cluster CA. `ASYNCOPD_K8S_API_URL`, `ASYNCOPD_K8S_TOKEN_FILE` and `ASYNCOPD_K8S_CA_FILE` override them
(a coordinator outside the cluster; the tests' fake API server).

Every failure is a `PoolError` carrying the HTTP status the REST API answers with and a message that says
what to fix: 502 when the API server answered with an error (401, 403, 404, ...), 503 when it cannot be
reached, 504 when it timed out. tests/integration/test_k8s_pool.py runs this against a local HTTP fake of
exactly the two endpoints above.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import httpx

from services.coordinator.pools.base import PoolError, RolloutPool

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


def in_cluster_api_url() -> str | None:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        return None
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"  # IPv6 service IPs


class KubernetesPool(RolloutPool):
    def __init__(self, namespace: str, deployment: str, *, api_url: str | None = None,
                 token_file: Path | str | None = None, ca_file: Path | str | None = None,
                 timeout_s: float = 10.0, settings=None) -> None:
        if settings is None:  # build_pool passes only the names; the overrides come from the same environment
            from services.coordinator.settings import CoordinatorSettings

            settings = CoordinatorSettings()
        self.namespace, self.deployment = namespace, deployment
        self.api_url = (api_url or settings.k8s_api_url or in_cluster_api_url() or "").rstrip("/")
        if not self.api_url:
            raise ValueError("ASYNCOPD_POOL_BACKEND=kubernetes needs the Kubernetes API: run the coordinator in "
                             "a pod (KUBERNETES_SERVICE_HOST is unset here) or set ASYNCOPD_K8S_API_URL")
        self.token_file = Path(token_file or settings.k8s_token_file)
        if not self.token_file.is_file():
            raise ValueError(f"ASYNCOPD_POOL_BACKEND=kubernetes needs a service-account token: {self.token_file} "
                             "does not exist (automountServiceAccountToken off?) — set ASYNCOPD_K8S_TOKEN_FILE")
        verify: ssl.SSLContext | bool = True  # the system CAs unless a bundle is named
        ca = ca_file or settings.k8s_ca_file
        if ca and self.api_url.startswith("https://"):
            if not Path(ca).is_file():
                raise ValueError(f"Kubernetes API CA bundle {ca} does not exist — set ASYNCOPD_K8S_CA_FILE")
            verify = ssl.create_default_context(cafile=str(ca))
        self.what = f"Deployment {namespace}/{deployment}"
        self.url = f"{self.api_url}/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"
        self.client = httpx.Client(verify=verify, timeout=timeout_s)

    def desired(self) -> int:
        return self._replicas(self._request("GET", None))

    def scale(self, replicas: int) -> int:
        return self._replicas(self._request("PATCH", {"spec": {"replicas": replicas}}))

    def close(self) -> None:
        self.client.close()  # the Deployment keeps its replicas: the cluster owns them

    # -- HTTP ------------------------------------------------------------------------------------------

    def _token(self) -> str:
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise PoolError(503, f"cannot read the service-account token {self.token_file}: {exc}") from exc

    def _request(self, method: str, body: dict | None) -> dict:
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = MERGE_PATCH
        try:
            resp = self.client.request(method, self.url, headers=headers, json=body)
        except httpx.TimeoutException as exc:
            raise PoolError(504, f"Kubernetes API at {self.api_url} timed out scaling {self.what}: "
                                 f"{type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise PoolError(503, f"Kubernetes API unreachable at {self.api_url}: {exc or type(exc).__name__}") \
                from exc
        if resp.status_code >= 400:
            raise PoolError(502 if resp.status_code != 429 else 503, self._explain(method, resp))
        try:
            return resp.json()
        except ValueError as exc:
            raise PoolError(502, f"Kubernetes API answered {method} {self.what} scale with non-JSON "
                                 f"({resp.headers.get('content-type', 'no content type')})") from exc

    def _explain(self, method: str, resp: httpx.Response) -> str:
        try:
            detail = resp.json().get("message") or resp.text
        except ValueError:
            detail = resp.text
        detail = (detail or resp.reason_phrase).strip()[:300]
        code, verb = resp.status_code, "get" if method == "GET" else "patch"
        if code == 401:
            hint = (f"the API server rejected the coordinator's token ({self.token_file}); it may have expired "
                    "or belong to another cluster")
        elif code == 403:
            hint = (f"the coordinator's service account may not {verb} deployments/scale of {self.what}; "
                    "the chart's coordinator Role grants exactly that (is coordinator.rbac.create off?)")
        elif code == 404:
            hint = (f"{self.what} not found; check ASYNCOPD_K8S_NAMESPACE and ASYNCOPD_K8S_ROLLOUT_DEPLOYMENT "
                    "(is rollout.enabled off?)")
        elif code == 429:
            hint = "the API server is throttling requests; retry shortly"
        else:
            hint = f"scaling {self.what} failed"
        return f"Kubernetes API {code} {resp.reason_phrase}: {hint} ({detail})"

    def _replicas(self, scale: dict) -> int:
        try:
            return int((scale.get("spec") or {}).get("replicas", 0))
        except (AttributeError, TypeError, ValueError) as exc:
            raise PoolError(502, f"Kubernetes API returned a malformed Scale for {self.what}: {scale!r:.200}") \
                from exc
