"""The Python client of the coordinator's REST API: what the CLI, the bench harness and the tests use.

Responses come back as the API's own models (`asyncopd.api_models`); any 4xx/5xx raises `ApiError` with
the status and the server's message (field errors joined as `field: msg`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from asyncopd.api_models import EvalPage, JobList, JobView, Pools, ScaleResponse, StepPage
from asyncopd.records import TERMINAL_STATES, EvalRecord, StepRecord


class ApiError(RuntimeError):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"error {status_code}: {message}")
        self.status_code, self.message = status_code, message


class TokenFileError(ValueError):
    """A token file named by the environment that cannot be read."""


def env_token(name: str) -> str | None:
    """A secret from the environment: `name` itself, else the file `name`_FILE names (a mounted Secret, a file
    only you can read), stripped; None when neither is set. A file that cannot be read is an error."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise TokenFileError(f"{name}_FILE={path}: cannot read the token: {exc.strerror}") from None


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30) -> None:
        """`token`: the API's bearer token; default ASYNCOPD_API_TOKEN, else the file ASYNCOPD_API_TOKEN_FILE."""
        self.base_url = base_url
        token = token if token is not None else env_token("ASYNCOPD_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _message(resp))
        return resp.json()

    def submit(self, spec: dict) -> JobView:
        return JobView.model_validate(self._call("POST", "/v1/jobs", json=spec))

    def job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def jobs(self) -> list[JobView]:
        return JobList.model_validate(self._call("GET", "/v1/jobs")).jobs

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def steps(self, job_id: str) -> Iterator[StepRecord]:
        """Every step record, page by page."""
        after: int | None = 0
        while after is not None:
            page = StepPage.model_validate(self._call("GET", f"/v1/jobs/{job_id}/steps", params={"after": after}))
            yield from page.steps
            after = page.next_after

    def evals(self, job_id: str) -> Iterator[EvalRecord]:
        after: int | None = 0
        while after is not None:
            page = EvalPage.model_validate(self._call("GET", f"/v1/jobs/{job_id}/evals", params={"after": after}))
            yield from page.evals
            after = page.next_after

    def pools(self) -> Pools:
        return Pools.model_validate(self._call("GET", "/v1/pools"))

    def scale(self, pool: str, replicas: int) -> int:
        body = self._call("PUT", f"/v1/pools/{pool}", json={"replicas": replicas})
        return ScaleResponse.model_validate(body).replicas

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait(self, job_id: str, timeout_s: float = 300, interval_s: float = 0.3, on_poll=None) -> JobView:
        """Poll until the job ends (succeeded, failed or cancelled); `on_poll(job)` sees every poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.state in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s}s")
            time.sleep(interval_s)


def _message(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        return resp.text
    if isinstance(detail, list):
        return "; ".join(f"{d.get('field') or '.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)


def absolutize(spec: dict, base: Path) -> dict:
    """Make local input paths in a job file absolute, so the services find them whatever their working
    directory."""
    def fix(value: str) -> str:
        p = Path(value)
        return str((base / p).absolute()) if not p.is_absolute() and (base / p).exists() else value

    for section, key in (("student", "model"), ("teacher", "model"), ("prompts", "path"),
                         ("prompts", "heldout_path")):
        if isinstance(spec.get(section), dict) and isinstance(spec[section].get(key), str):
            spec[section][key] = fix(spec[section][key])
    # output_dir stays as written: the coordinator takes a relative one under its output roots.
    return spec


def load_job_file(path: Path, base: Path | None = None) -> dict:
    """A job file (YAML or JSON) as a request body, local paths made absolute against `base` (the cwd)."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a job file must hold a mapping")
    return absolutize(spec, base or Path.cwd())
