"""Schemathesis against the coordinator's own OpenAPI document (a real process, real Redis): generated
requests, valid and invalid, for every operation; none may answer 5xx or leave the documented responses.

Bounded (`MAX_EXAMPLES` per operation, derandomized) so it runs in `make test`. The pool backend is
`kubernetes` with an API server that does not answer: generated `PUT /v1/pools/rollout` bodies then get the
documented 503 instead of starting up to 1024 local rollout processes.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from asyncopd.ports import free_port
from tests.integration.test_bad_input import start_coordinator

MAX_EXAMPLES = 40
TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def fuzz_api(redis_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("coord-fuzz")
    (run / "k8s-token").write_text("x")
    proc, url = start_coordinator(
        redis_server.rsplit("/", 1)[0] + "/5", run, ASYNCOPD_API_TOKEN=TOKEN, ASYNCOPD_POOL_BACKEND="kubernetes",
        ASYNCOPD_K8S_API_URL=f"http://127.0.0.1:{free_port()}", ASYNCOPD_K8S_TOKEN_FILE=str(run / "k8s-token"))
    yield url
    proc.terminate()
    proc.wait(30)


def test_every_ref_resolves_in_the_document(fuzz_api):
    doc = httpx.get(f"{fuzz_api}/openapi.json").json()
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and all(r.startswith("#/components/schemas/") for r in refs), sorted(refs)
    assert {r.rsplit("/", 1)[1] for r in refs} <= doc["components"]["schemas"].keys()
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "$defs" not in str(doc)


def fuzz(operation, mode: GenerationMode, base_url: str, headers: dict, tried: dict[str, int]) -> None:
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    if operation.label != "PUT /v1/pools/rollout":  # its documented 503: the (absent) Kubernetes API is down
        checks.append(not_a_server_error)
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(base_url=base_url, headers=headers, checks=checks)
        tried[f"{operation.label} {mode}"] = tried.get(f"{operation.label} {mode}", 0) + 1

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # an operation without parameters has no invalid input


def test_generated_requests_never_break_the_api(fuzz_api):
    """Every operation, with schema-valid (positive) and schema-breaking (negative) requests: no 5xx, only
    documented status codes and content types, responses that match their schema, invalid input refused."""
    auth = {"authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{fuzz_api}/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    tried: dict[str, int] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, fuzz_api, auth, tried)
    assert httpx.get(f"{fuzz_api}/v1/jobs", headers=auth).status_code == 200
    print(f"schemathesis: {sum(tried.values())} requests over {len(tried)} operation modes: {tried}")
