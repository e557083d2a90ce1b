"""The REST API (DESIGN.md §4). One error shape, `{"detail": ...}`; invalid input is a 4xx naming the field.

No request can break it for others: bodies are capped (`max_body_bytes`, 413) and parsed off the event loop,
only JSON and YAML media types are taken (415: a web page cannot post a job as text/plain without a CORS
preflight), a body that is not text, nests too deeply or holds lone surrogate escapes is a 400, job ids in
paths must match the pattern the API owns before any Redis key is built from them, and an unexpected failure
is a 500 in the same error shape (the coordinator's log has the traceback).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from asyncopd import state
from asyncopd.api_models import (
    DEFAULT_PAGE,
    JOB_ID_PATTERN,
    MAX_PAGE,
    ErrorResponse,
    EvalPage,
    JobList,
    JobView,
    Pool,
    Pools,
    ScaleRequest,
    ScaleResponse,
    Status,
    StepPage,
)
from asyncopd.jobspec import JobSpec
from asyncopd.outputs import OutputDirError
from services.coordinator.jobs import JobConflict, JobNotFound, JobStore
from services.coordinator.metrics import HTTP_SECONDS
from services.coordinator.pools import PoolError, RolloutPool
from services.coordinator.runner import JobRunner

log = logging.getLogger(__name__)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422)}
JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MAX_DEPTH = 32  # a job spec nests 4 levels; deeper is an attack or an accident
MAX_NODES = 100_000  # values in a body, counted through YAML aliases (a "billion laughs" body stops here)
DEFAULT_MAX_BODY_BYTES = 256 << 10
JOB_ID = re.compile(JOB_ID_PATTERN)


def _text(value: object) -> str:
    """A string safe to put in a JSON response: lone surrogates (from `\\ud800` escapes) written as escapes."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _field_errors(errors, root: str | None = None) -> list[dict]:
    """Pydantic errors in the API's shape: `loc` from the request's root (body, query, path), `field` the
    dotted path below it."""
    out = []
    for e in errors:
        loc = [root, *e["loc"]] if root else list(e["loc"])
        out.append({"loc": [p if isinstance(p, int) else _text(p) for p in loc],
                    "field": _text(".".join(str(p) for p in loc[1:])), "msg": _text(e["msg"]), "type": e["type"]})
    return out


def _errors(exc: ValidationError, root: str) -> list[dict]:
    return _field_errors(exc.errors(), root)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_json(request: Request) -> None:
    """415 unless the request says its body is JSON (a dependency of the routes that take a JSON body)."""
    if media_type(request) not in JSON_TYPES:
        raise HTTPException(415, "send the body as application/json")


def parse_spec_body(raw: bytes, media: str) -> dict:
    """A job spec body (JSON or YAML) as a mapping; HTTPException 400/422 naming what is wrong. Runs in a
    worker thread: parsing must never hold the event loop (health checks answer meanwhile)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"request body is not UTF-8 text (byte {exc.start})") from None
    kind = "JSON" if media in JSON_TYPES else "YAML"
    try:
        body = json.loads(text) if kind == "JSON" else (yaml.safe_load(text) if text.strip() else None)
    except RecursionError:
        raise HTTPException(400, f"request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise HTTPException(400, f"request body is not valid {kind}: {_text(exc)}") from None
    check_shape(body)
    if not isinstance(body, dict):
        raise HTTPException(422, [{"loc": ["body"], "field": "", "msg": "a job spec must be a mapping",
                                   "type": "dict_type"}])
    return body


def check_shape(body: object) -> None:
    """Bounded depth and size, and text only: a lone UTF-16 surrogate (`"\\ud800"`) is no character and could
    be neither stored nor answered."""
    stack, seen = [(body, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH:
            raise HTTPException(400, f"request body nests deeper than {MAX_DEPTH} levels")
        if seen > MAX_NODES:
            raise HTTPException(400, f"request body holds more than {MAX_NODES} values (YAML aliases count each "
                                "time they are used)")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise HTTPException(400, "request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                                    "which is not a character") from None
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for kv in value.items() for item in kv)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


class RequestTimer:
    """ASGI middleware: every request's time in `asyncopd_http_request_seconds`, labelled by the route template
    the router matched ("unmatched" for a 404), so a job id never becomes a label."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_SECONDS.labels(scope["method"], route, str(status)).observe(time.perf_counter() - t0)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, by its Content-Length before anything is
    read, or while it is read (a chunked body) before the rest arrives."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"detail": f"request body over {self.limit} bytes (max_body_bytes)"}, 413)
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes (max_body_bytes)")
            return message

        return await self.app(scope, limited, send)


def create_app(store: JobStore, runner: JobRunner, pool: RolloutPool, api_token: str | None,
               on_shutdown=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, probe=None) -> FastAPI:
    """`probe`: a Redis client that fails at once (no retries) for /readyz; default the store's."""
    r = store.r
    probe = probe or r

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.close()
        if on_shutdown:
            await run_in_threadpool(on_shutdown)

    app = FastAPI(title="asyncopd coordinator", version="1", lifespan=lifespan, responses=ERRORS)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RequestTimer)  # added last: the outermost, so a 413 from BodyLimit is timed too

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own 422s (query, path and body parameters) in the one error shape, naming each field.
        return JSONResponse({"detail": _field_errors(exc.errors())}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, list) else _text(exc.detail)
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error; the coordinator's log has the details"}, 500)

    def authorize(request: Request) -> None:
        if api_token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    v1 = [Depends(authorize)]

    def job_id_param(job_id: str = PathParam(description="A job id as `POST /v1/jobs` returned it.",
                                             json_schema_extra={"pattern": JOB_ID_PATTERN})) -> str:
        """Checked before anything is read: an id that cannot be a job's never reaches a Redis key."""
        if not JOB_ID.fullmatch(job_id):
            raise HTTPException(404, f"no job {job_id!r} (job ids look like NAME-1a2b3c4d)")
        return job_id

    JobId = Depends(job_id_param)

    @app.get("/healthz", response_model=Status, response_model_exclude_none=True)
    def healthz():
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, response_model_exclude_none=True, responses={503: {"model": Status}})
    def readyz(response: Response):
        try:
            probe.ping()
        except Exception as exc:
            response.status_code = 503
            return Status(status="redis unreachable", detail=str(exc))
        if not runner.alive():
            response.status_code = 503
            return Status(status="job runner not running")
        return Status(status="ready")

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    spec_ref = {"schema": {"$ref": "#/components/schemas/JobSpec"}}

    @app.post("/v1/jobs", status_code=201, dependencies=v1, response_model=JobView, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": spec_ref, "application/yaml": spec_ref}}})
    async def submit(request: Request):
        """Submit a job spec as JSON or YAML (`Content-Type: application/json` or `application/yaml`). It runs
        when the jobs before it are done."""
        media = media_type(request)
        if media not in JSON_TYPES + YAML_TYPES:
            raise HTTPException(415, f"send the job spec as application/json or application/yaml, not "
                                f"{_text(media) or 'a body without Content-Type'}")
        raw = await request.body()
        body = await run_in_threadpool(parse_spec_body, raw, media)
        try:
            spec = await run_in_threadpool(JobSpec.model_validate, body)
        except ValidationError as exc:
            raise HTTPException(422, _errors(exc, "body")) from None
        try:
            job_id = await run_in_threadpool(store.create, spec)
        except OutputDirError as exc:
            raise HTTPException(422, [{"loc": ["body", "output_dir"], "field": "output_dir", "msg": _text(exc),
                                       "type": "output_dir"}]) from None
        return await run_in_threadpool(store.view, job_id)

    @app.get("/v1/jobs", dependencies=v1, response_model=JobList)
    def list_jobs():
        jobs = []
        for job_id in store.ids():
            try:
                jobs.append(store.view(job_id))
            except JobNotFound:  # deleted between the list and the read
                continue
        return JobList(jobs=jobs)

    @app.get("/v1/jobs/{job_id}", dependencies=v1, response_model=JobView)
    def get_job(job_id: str = JobId):
        try:
            return store.view(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None

    page = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="Records per page.")

    @app.get("/v1/jobs/{job_id}/steps", dependencies=v1, response_model=StepPage)
    def get_steps(job_id: str = JobId, after: int = Query(0, ge=0, description="The last step already read."),
                  limit: int = page):
        """The learner's per-step records (loss, KL, staleness histogram, drops, timings), a page at a time."""
        try:
            return store.steps(job_id, after, limit)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.get("/v1/jobs/{job_id}/evals", dependencies=v1, response_model=EvalPage)
    def get_evals(job_id: str = JobId, after: int = Query(0, ge=0, description="Evaluations already read."),
                  limit: int = page):
        """The held-out evaluations (accuracy, KL to the teacher) of published versions, when the job sets
        `eval.every`."""
        try:
            return store.evals(job_id, after, limit)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=v1, response_model=JobView)
    def cancel(job_id: str = JobId):
        try:
            return store.cancel(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/v1/pools", dependencies=v1, response_model=Pools)
    def pools():
        """Live instances per pool (heartbeats) and the rollout pool's desired size. When the pool backend
        cannot answer (Kubernetes API unreachable or refusing), `desired` is null and `desired_error` says why."""
        live = state.live_services(r)
        out = {name: Pool(live=len(members), instances=members)
               for name in ("rollout", "teacher", "learner")
               for members in [[s for s in live if s.service == name]]}
        try:
            out["rollout"].desired = pool.desired()
        except PoolError as exc:
            out["rollout"].desired_error = str(exc)
        return Pools(**out)

    @app.put("/v1/pools/rollout", dependencies=[*v1, Depends(require_json)], response_model=ScaleResponse, responses={
        502: {"model": ErrorResponse, "description": "the Kubernetes API refused (401, 403, 404, ...)"},
        503: {"model": ErrorResponse, "description": "the Kubernetes API is unreachable"},
        504: {"model": ErrorResponse, "description": "the Kubernetes API timed out"}})
    def scale(body: ScaleRequest):
        try:
            return ScaleResponse(replicas=pool.scale(body.replicas))
        except PoolError as exc:
            raise HTTPException(exc.status_code, str(exc)) from None

    def openapi() -> dict:
        """FastAPI's document, plus the job spec (the POST body, read by hand to take YAML too) and the models
        it uses as components, so every `$ref` resolves in `#/components/schemas`."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in {**spec.pop("$defs", {}), "JobSpec": spec}.items():
                schemas.setdefault(name, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app
