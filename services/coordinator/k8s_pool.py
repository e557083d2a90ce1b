"""Rollout pool backed by a Kubernetes Deployment's scale subresource, called with in-cluster credentials.

Only two endpoints are used (GET and PATCH .../deployments/NAME/scale), so this speaks plain HTTPS instead of
pulling in the kubernetes client; tests run it against a local fake of exactly those endpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from services.coordinator.pools import RolloutPool

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubernetesPool(RolloutPool):
    def __init__(self, namespace: str, deployment: str, *, api_url: str | None = None, token: str | None = None,
                 verify: str | bool | None = None) -> None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api_url = api_url or f"https://{host}:{port}"
        token = token if token is not None else (SA_DIR / "token").read_text().strip()
        verify = verify if verify is not None else str(SA_DIR / "ca.crt")
        self.url = f"{self.api_url}/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"
        self.client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=10)

    def desired(self) -> int:
        resp = self.client.get(self.url)
        resp.raise_for_status()
        return int(resp.json()["spec"].get("replicas", 0))

    def scale(self, replicas: int) -> int:
        resp = self.client.patch(self.url, json={"spec": {"replicas": replicas}},
                                 headers={"Content-Type": "application/merge-patch+json"})
        resp.raise_for_status()
        return int(resp.json()["spec"]["replicas"])

    def close(self) -> None:
        self.client.close()  # the Deployment keeps its replicas: the cluster owns them
