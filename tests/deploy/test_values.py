"""values.yaml, values.schema.json and the CI values files: bad values are rejected with a clear message,
the schema and the values cannot drift apart, every key is documented."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.chart_support import chartcheck, render_with

VALUES = chartcheck.CHART / "values.yaml"
SCHEMA = json.loads((chartcheck.CHART / "values.schema.json").read_text())


# -- the schema rejects bad values, naming the key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "rollout.gpus=-1"], "at '/rollout/gpus': minimum: got -1, want 0"),
        (
            ["--set", "rollout.config.engine=tgi"],
            "at '/rollout/config/engine': value must be one of 'vllm', 'hf'",
        ),
        (["--set", "teacher.config.dtype=fp8"], "at '/teacher/config/dtype'"),
        (["--set", "learner.config.zeroStage=4"], "at '/learner/config/zeroStage'"),
        (["--set", "rollout.config.weightsTransport=rdma"], "at '/rollout/config/weightsTransport'"),
        (["--set", "learner.config.weightsFallback=nccl"], "at '/learner/config/weightsFallback'"),
        (["--set", "rollout.config.weightsTransferTimeoutS=0"], "at '/rollout/config/weightsTransferTimeoutS'"),
        (["--set", "rollout.config.weightsTransferJoinS=0"], "at '/rollout/config/weightsTransferJoinS'"),
        (["--set", "learner.config.weightsTransferPort=65536"], "at '/learner/config/weightsTransferPort'"),
        (["--set", "rollout.config.weightsTransferPort=29600"], "at '/rollout/config': additional properties"),
        (["--set", "rollout.config.gpuMemoryUtilization=1.5"], "at '/rollout/config/gpuMemoryUtilization'"),
        (["--set", "coordinator.replicaCount=2"], "at '/coordinator/replicaCount': maximum: got 2, want 1"),
        (["--set", "rollout.gpu=2"], "at '/rollout': additional properties 'gpu' not allowed"),
        (["--set", "rollout.image.pullPolicy=Sometimes"], "at '/rollout/image/pullPolicy'"),
        (["--set", "rollout.gpuResourceName=nvidia gpu"], "at '/rollout/gpuResourceName'"),
        (["--set", "redis.image.tag="], "at '/redis/image/tag'"),
        (["--set", "persistence.size=lots"], "at '/persistence/size'"),
        (["--set", "persistence.accessModes[0]=ReadWriteSometimes"], "at '/persistence/accessModes/0'"),
        (["--set", "coordinator.config.poolBackend=swarm"], "at '/coordinator/config/poolBackend'"),
        (
            ["--set", "metrics.prometheusRule.alerts.staleDropFor=ten minutes"],
            "at '/metrics/prometheusRule/alerts/staleDropFor'",
        ),
        (["--set", "learner.replicaCount=0"], "at '/learner/replicaCount'"),
        (["--set", "externalRedis.url=http://redis:6379"], "at '/externalRedis/url'"),
    ],
)
def test_schema_rejects_bad_values(args, message):
    p = render_with(*args)
    assert p.returncode != 0, f"{args} was accepted"
    assert "values don't meet the specifications of the schema" in p.stderr
    assert message in p.stderr, p.stderr


# -- cross-value rules (templates/_validate.tpl) fail with a sentence that names the fix -------------------

NCCL = ["--set", "learner.config.weightsTransport=nccl", "--set", "rollout.config.weightsTransport=nccl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "redis.enabled=false"], "externalRedis.url is required when redis.enabled=false"),
        (
            ["--set", "redis.enabled=false", "--set", "externalRedis.url=redis://:hunter2@redis:6379/0"],
            "externalRedis.url must not contain credentials",
        ),
        (
            ["--set", "externalRedis.url=redis://redis:6379/0"],
            "set redis.enabled=false to use the external Redis",
        ),
        (["--set", "rollout.gpus=0"], "rollout.config.device=cuda needs rollout.gpus >= 1"),
        (["--set", "learner.config.weightsTransport=delta"],
         "learner.config.weightsTransport=delta but rollout.config.weightsTransport=filesystem"),
        (
            [*NCCL, "--set", "learner.config.weightsFallback=filesystem"],
            "learner.config.weightsFallback=filesystem but rollout.config.weightsFallback=delta",
        ),
        (
            [*NCCL, "--set-json", "rollout.config.weightsTransferTimeoutS=30.5"],
            "learner.config.weightsTransferTimeoutS=60 but rollout.config.weightsTransferTimeoutS=30.5",
        ),
        (
            [*NCCL, "--set", "learner.config.weightsTransferPort=29400"],
            "learner.config.weightsTransferPort=29400 is also learner.torchrun.rendezvousPort",
        ),
        (["--set", "learner.gpus=0"], "learner.config.device=cuda needs learner.gpus >= 1"),
        (
            [
                "--set",
                "rollout.keda.enabled=true",
                "--set",
                "rollout.autoscaling.enabled=true",
                "--api-versions",
                "keda.sh/v1alpha1/ScaledObject",
            ],
            "enable only one",
        ),
        (
            [
                "--set",
                "rollout.keda.enabled=true",
                "--set",
                "rollout.keda.minReplicaCount=9",
                "--api-versions",
                "keda.sh/v1alpha1/ScaledObject",
            ],
            "rollout.keda.minReplicaCount (9) is greater than",
        ),
        (
            ["--set", "teacher.autoscaling.enabled=true", "--set", "teacher.autoscaling.minReplicas=5"],
            "teacher.autoscaling.minReplicas (5) is greater than teacher.autoscaling.maxReplicas (4)",
        ),
        (
            [
                "--set",
                "metrics.serviceMonitor.enabled=true",
                "--set",
                "metrics.podMonitor.enabled=true",
                "--api-versions",
                "monitoring.coreos.com/v1",
            ],
            "scraped twice",
        ),
        (
            ["--set-json", 'rollout.extraEnv=[{"name":"WANDB_API_KEY","value":"abc"}]'],
            "rollout.extraEnv WANDB_API_KEY carries a secret as a plain value",
        ),
    ],
)
def test_cross_value_rules_fail_with_a_clear_message(args, message):
    p = render_with(*args)
    assert p.returncode != 0, f"{args} was accepted"
    assert message in p.stderr, p.stderr


def test_nccl_settings_need_not_match_under_another_transport():
    """weightsFallback and weightsTransferTimeoutS only matter with nccl: without it they may differ."""
    p = render_with("--set", "learner.config.weightsFallback=filesystem",
                    "--set", "rollout.config.weightsTransferTimeoutS=5")
    assert p.returncode == 0, p.stderr


def test_a_secret_from_a_secret_ref_is_fine():
    p = render_with(
        "--set-json",
        'rollout.extraEnv=[{"name":"WANDB_API_KEY","valueFrom":'
        '{"secretKeyRef":{"name":"wandb","key":"key"}}}]',
    )
    assert p.returncode == 0, p.stderr


# -- schema and values.yaml stay in step -------------------------------------------------------------------


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _leaf_paths(value, path=()):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaf_paths(v, (*path, k))
    else:
        yield path


def _schema_at(path):
    node = _resolve(SCHEMA)
    for key in path:
        props = node.get("properties")
        if props is None:  # a free-form object/map: everything below is allowed
            return node, True
        if key not in props:
            return None, False
        node = _resolve(props[key])
    return node, False


def test_every_value_is_declared_in_the_schema():
    values = yaml.safe_load(VALUES.read_text())
    undeclared = []
    for path in _leaf_paths(values):
        node, _ = _schema_at(path)
        if node is None:
            undeclared.append(".".join(path))
    assert not undeclared, f"values.yaml keys missing from values.schema.json: {undeclared}"


def test_every_schema_property_has_a_default_in_values():
    values = yaml.safe_load(VALUES.read_text())
    missing = []

    def walk(node, value, path):
        node = _resolve(node)
        for key, sub in node.get("properties", {}).items():
            if not isinstance(value, dict) or key not in value:
                # Optional knobs only the schema knows (probe initialDelaySeconds) are fine.
                if key in node.get("required", []):
                    missing.append(".".join((*path, key)))
                continue
            walk(sub, value[key], (*path, key))

    walk(SCHEMA, values, ())
    assert not missing, f"required schema keys without a default in values.yaml: {missing}"


def test_objects_reject_unknown_keys():
    """Every object with declared properties is closed, so a typo in a key fails instead of being ignored."""
    open_objects = []

    def walk(node, path):
        if "$ref" in node:
            return
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                open_objects.append(path or "<root>")
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(SCHEMA, "")
    for name, d in SCHEMA["definitions"].items():
        walk(d, f"#{name}")
    assert not open_objects


def test_every_values_key_is_documented_helm_docs_style():
    """Each key has a `# --` comment, or sits in a block whose key has one (free-form blocks such as
    resources are documented as a whole), or is a section whose children are all documented."""
    lines = VALUES.read_text().splitlines()
    entries = []  # (indent, key, documented)
    comment_block: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        if not stripped:
            comment_block = []
            continue
        indent = len(line) - len(line.lstrip())
        m = re.match(r"(\s*)([A-Za-z_][\w-]*):", line)
        if m and not stripped.startswith("- "):
            entries.append((indent, m.group(2), any(c.startswith("# --") for c in comment_block)))
        comment_block = []

    undocumented = []
    stack: list[tuple[int, str, bool]] = []  # ancestors: (indent, key, documented-or-covered)
    for i, (indent, key, documented) in enumerate(entries):
        while stack and stack[-1][0] >= indent:
            stack.pop()
        covered = any(doc for _, _, doc in stack)
        has_children = i + 1 < len(entries) and entries[i + 1][0] > indent
        path = ".".join([k for _, k, _ in stack] + [key])
        if not (documented or covered or has_children):
            undocumented.append(path)
        stack.append((indent, key, documented or covered))
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"


# -- CI scenarios ------------------------------------------------------------------------------------------


def test_ci_scenarios_cover_what_the_issue_asks_for():
    names = {s.name for s in chartcheck.scenarios()}
    assert {
        "default",
        "gpu",
        "cpu",
        "external-redis",
        "keda",
        "keda-off-hpa",
        "multirank-learner",
        "monitoring",
        "minimal",
        "nccl",
    } <= names


@pytest.mark.parametrize("path", sorted(chartcheck.CI_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_ci_values_files_parse_and_start_with_a_description(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data
    head = [
        line
        for line in path.read_text().splitlines()[:3]
        if line.startswith("# ") and "helm-template-args" not in line
    ]
    assert head, f"{path.name} should start with a comment saying what the scenario covers"
