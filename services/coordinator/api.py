"""The REST API (DESIGN.md §4). One error shape, `{"detail": ...}`; invalid input is a 4xx naming the field."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

import yaml
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError

from asyncopd import state
from asyncopd.jobspec import JobSpec
from services.coordinator.jobs import JobConflict, JobNotFound, JobStore
from services.coordinator.pools import PoolError, RolloutPool
from services.coordinator.runner import JobRunner


class ScaleBody(BaseModel):
    replicas: int = Field(ge=0, le=1024)


def _errors(exc: ValidationError, root: str) -> list[dict]:
    return [{"loc": [root, *e["loc"]], "field": ".".join(str(p) for p in e["loc"]), "msg": e["msg"],
             "type": e["type"]} for e in exc.errors()]


def create_app(store: JobStore, runner: JobRunner, pool: RolloutPool, api_token: str | None,
               on_shutdown=None) -> FastAPI:
    r = store.r

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.close()
        if on_shutdown:
            await run_in_threadpool(on_shutdown)

    app = FastAPI(title="asyncopd coordinator", version="1", lifespan=lifespan)

    def authorize(request: Request) -> None:
        if api_token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    v1 = [Depends(authorize)]

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response):
        try:
            r.ping()
        except Exception as exc:
            response.status_code = 503
            return {"status": "redis unreachable", "detail": str(exc)}
        if not runner.alive():
            response.status_code = 503
            return {"status": "job runner not running"}
        return {"status": "ready"}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/jobs", status_code=201, dependencies=v1, openapi_extra={"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": JobSpec.model_json_schema()},
                    "application/yaml": {"schema": JobSpec.model_json_schema()}}}})
    async def submit(request: Request):
        """Submit a job spec as JSON or YAML. It runs when the jobs before it are done."""
        raw = await request.body()
        try:
            body = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise HTTPException(400, f"request body is neither JSON nor YAML: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPException(422, [{"loc": ["body"], "field": "", "msg": "a job spec must be a mapping",
                                       "type": "dict_type"}])
        try:
            spec = JobSpec.model_validate(body)
        except ValidationError as exc:
            raise HTTPException(422, _errors(exc, "body")) from exc
        job_id = await run_in_threadpool(store.create, spec)
        return await run_in_threadpool(store.view, job_id)

    @app.get("/v1/jobs", dependencies=v1)
    def list_jobs():
        return {"jobs": [store.view(i) for i in store.ids()]}

    @app.get("/v1/jobs/{job_id}", dependencies=v1)
    def get_job(job_id: str):
        try:
            return store.view(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.get("/v1/jobs/{job_id}/steps", dependencies=v1)
    def get_steps(job_id: str):
        """The learner's per-step records (loss, KL, staleness histogram, drops, timings) and its held-out
        evaluations (accuracy, KL to the teacher) when the job asked for them."""
        try:
            return store.records(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=v1)
    def cancel(job_id: str):
        try:
            return store.cancel(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/v1/pools", dependencies=v1)
    def pools():
        """Live instances per pool (heartbeats) and the rollout pool's desired size. When the pool backend
        cannot answer (Kubernetes API unreachable or refusing), `desired` is null and `desired_error` says why."""
        live = state.live_services(r)
        out = {}
        for name in ("rollout", "teacher", "learner"):
            members = [s for s in live if s["service"] == name]
            out[name] = {"live": len(members), "instances": members}
        try:
            out["rollout"]["desired"] = pool.desired()
        except PoolError as exc:
            out["rollout"]["desired"], out["rollout"]["desired_error"] = None, str(exc)
        return out

    @app.put("/v1/pools/rollout", dependencies=v1, responses={
        502: {"description": "the Kubernetes API refused (401, 403, 404, ...)"},
        503: {"description": "the Kubernetes API is unreachable"},
        504: {"description": "the Kubernetes API timed out"}})
    def scale(body: ScaleBody):
        try:
            return {"replicas": pool.scale(body.replicas)}
        except PoolError as exc:
            raise HTTPException(exc.status_code, str(exc)) from None

    return app
