"""The chart's security model (DESIGN.md §7): read-only root filesystems with emptyDirs for what the services
write, no service-account token where a pod never calls the Kubernetes API, NetworkPolicies saying who reaches
which port, the gRPC token, loopback-by-default bind addresses opened explicitly, the Redis password never on
a command line, and a warning when the REST API is exposed without a token."""

from __future__ import annotations

import json

import pytest

from tests.deploy.chart_support import chartcheck, render_with
from tests.deploy.test_chart import SCENARIOS, container, env_of, objs, workload

ASYNCOPD = ("rollout", "teacher", "learner", "coordinator")
# What the services write besides the data volume: tempfiles and torchrun state (/tmp), the engines' caches
# under $HOME (vLLM, Triton, torch extensions, CUDA), shared memory for vLLM and NCCL.
WRITABLE = {"/tmp", "/home/asyncopd"}


def pods(manifests):
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet"):
            yield m["metadata"]["labels"]["app.kubernetes.io/component"], m["spec"]["template"]["spec"]
        elif m["kind"] == "Pod":
            yield m["metadata"]["labels"]["app.kubernetes.io/component"], m["spec"]


def rendered_with(*args: str) -> list[dict]:
    p = render_with(*args)
    assert p.returncode == 0, p.stderr
    return chartcheck.manifests(p.stdout)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_has_a_read_only_root_and_emptydirs_where_it_writes(rendered, scenario):
    for component, spec in pods(rendered[scenario]):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (component, c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            if component in ASYNCOPD:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert WRITABLE <= mounts.keys(), (component, mounts)
                for path in WRITABLE:
                    assert "emptyDir" in volumes[mounts[path]], (component, path)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_a_coordinator_that_scales_through_kubernetes_gets_a_service_account_token(rendered, scenario):
    for component, spec in pods(rendered[scenario]):
        expected = (component == "coordinator"
                    and env_of(spec["containers"][0])["ASYNCOPD_POOL_BACKEND"]["value"] == "kubernetes")
        assert spec["automountServiceAccountToken"] is expected, (scenario, component)


def test_a_local_pool_backend_coordinator_gets_no_token():
    (spec,) = [s for c, s in pods(rendered_with("--set", "coordinator.config.poolBackend=local"))
               if c == "coordinator"]
    assert spec["automountServiceAccountToken"] is False


def policy(manifests, component):
    (found,) = [m for m in objs(manifests, "NetworkPolicy")
                if m["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return found


def test_network_policies_say_who_reaches_which_port(rendered):
    manifests = rendered["default"]
    release = {"app.kubernetes.io/name": "asyncopd", "app.kubernetes.io/instance": "ci"}
    for component in (*ASYNCOPD, "redis"):
        p = policy(manifests, component)
        assert p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert p["spec"]["policyTypes"] == ["Ingress"]
    ports = {c: env_of(container(workload(manifests, c))) for c in ASYNCOPD}
    for component in ASYNCOPD:
        rules = policy(manifests, component)["spec"]["ingress"]
        assert rules[0] == {"from": [{"podSelector": {"matchLabels": release}}]}  # the release's own pods
        open_ports = {r["ports"][0]["port"] for r in rules[1:] if "from" not in r}
        grpc = int(ports[component]["ASYNCOPD_GRPC_PORT"]["value"])
        metrics = int(ports[component]["ASYNCOPD_METRICS_PORT"]["value"])
        assert grpc not in open_ports and metrics in open_ports  # gRPC only from the release by default
        if component == "coordinator":
            assert int(ports[component]["ASYNCOPD_HTTP_PORT"]["value"]) in open_ports
        else:
            assert open_ports == {metrics}
    (redis_rule,) = policy(manifests, "redis")["spec"]["ingress"]
    assert redis_rule["from"] == [{"podSelector": {"matchLabels": release}}]


def admits_on_every_port(netpol, pod_labels: dict) -> bool:
    """Whether a pod of this namespace with these labels reaches the policy's pods on every TCP port."""
    for rule in netpol["spec"].get("ingress", []):
        if "ports" in rule:
            continue
        for peer in rule.get("from", [{}]):
            sel = peer.get("podSelector")
            if (sel is not None and "namespaceSelector" not in peer and not sel.get("matchExpressions")
                    and sel.get("matchLabels", {}).items() <= pod_labels.items()):
                return True
    return False


@pytest.mark.parametrize("scenario", ["nccl", "default"])
def test_nccl_transfer_groups_reach_each_other_on_every_port(rendered, scenario):
    """A transfer round is a torch process group of learner rank 0 and the rollout pods: the TCPStore on the
    learner's weights-xfer port, then NCCL bootstrap / gloo connections on ephemeral ports between every pair of
    members (rollout<->rollout too). The release-wide rule of each policy admits them; egress is not restricted."""
    m = rendered[scenario]
    labels = {c: workload(m, c)["spec"]["template"]["metadata"]["labels"] for c in ("learner", "rollout")}
    for target in ("learner", "rollout"):
        netpol = policy(m, target)
        assert netpol["spec"]["policyTypes"] == ["Ingress"], target
        for source in ("learner", "rollout"):
            assert admits_on_every_port(netpol, labels[source]), f"{source} -> {target}"
    assert not admits_on_every_port(policy(m, "learner"), {"app.kubernetes.io/name": "other"})


def test_network_policies_take_the_peers_given_and_admit_keda_to_redis():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}
    manifests = rendered_with("--set-json", f"networkPolicy.grpcFrom=[{json.dumps(peer)}]",
                              "--set-json", f"networkPolicy.apiFrom=[{json.dumps(peer)}]",
                              "--set", "rollout.keda.enabled=true", "--api-versions", "keda.sh/v1alpha1/ScaledObject")
    rules = policy(manifests, "coordinator")["spec"]["ingress"]
    assert {"from": [peer], "ports": [{"port": 8000, "protocol": "TCP"}]} in rules
    assert {"from": [peer], "ports": [{"port": 50050, "protocol": "TCP"}]} in rules
    redis_from = policy(manifests, "redis")["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in redis_from
    assert not objs(rendered_with("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_services_bind_all_interfaces_in_pods_explicitly(rendered, scenario):
    for component in ASYNCOPD:
        env = env_of(container(workload(rendered[scenario], component)))
        assert env["ASYNCOPD_GRPC_HOST"]["value"] == env["ASYNCOPD_METRICS_HOST"]["value"] == "0.0.0.0"


def test_the_grpc_token_comes_from_a_secret_in_every_pod():
    manifests = rendered_with("--set", "grpc.auth.existingSecret=grpc-token")
    for component in ASYNCOPD:
        ref = env_of(container(workload(manifests, component)))["ASYNCOPD_GRPC_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "grpc-token", "key": "token"}


def test_the_coordinator_gets_its_limits_from_the_values(rendered):
    env = env_of(container(workload(rendered["default"], "coordinator")))
    assert env["ASYNCOPD_MAX_BODY_BYTES"]["value"] == "262144"
    assert env["ASYNCOPD_OUTPUT_ROOTS"]["value"] == "[]"
    assert env["ASYNCOPD_MAX_MODEL_LEN"]["value"] == "4096"
    manifests = rendered_with("--set", "teacher.config.maxModelLen=2048", "--set-json",
                              'coordinator.config.outputRoots=["/data/jobs","/data/outputs"]')
    env = env_of(container(workload(manifests, "coordinator")))
    assert env["ASYNCOPD_MAX_MODEL_LEN"]["value"] == "2048"
    assert env["ASYNCOPD_OUTPUT_ROOTS"]["value"] == '["/data/jobs","/data/outputs"]'
    assert "at '/coordinator/config/outputRoots/0'" in render_with(
        "--set-json", 'coordinator.config.outputRoots=["relative"]').stderr


def test_the_redis_password_never_reaches_a_command_line():
    manifests = rendered_with("--set", "redis.auth.existingSecret=redis-pw")
    c = container(workload(manifests, "redis"))
    assert "requirepass" not in " ".join(c.get("args", [])) and "$(REDIS_PASSWORD)" not in str(c)
    script = c["command"][2]
    assert c["command"][:2] == ["sh", "-c"] and "redis-server -" in script and '"$REDIS_PASSWORD"' in script
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-pw"


def notes(*args: str) -> str:
    p = chartcheck.run([str(chartcheck.HELM), "install", "ci", str(chartcheck.CHART), "--dry-run", "--namespace",
                        "asyncopd", *args])
    assert p.returncode == 0, p.stderr
    return p.stdout.split("NOTES:", 1)[1]


def test_notes_warn_when_an_ingress_exposes_the_api_without_a_token():
    text = notes("--set", "coordinator.ingress.enabled=true")
    assert "WARNING: the coordinator's REST API is exposed by an Ingress WITHOUT a token" in text
    assert "asyncopd.example.com" in text
    guarded = notes("--set", "coordinator.ingress.enabled=true", "--set", "coordinator.auth.existingSecret=api")
    assert "WITHOUT a token" not in guarded
    assert "WITHOUT a token" not in notes()
