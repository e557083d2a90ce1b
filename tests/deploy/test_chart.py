"""Assertions on the manifests the chart renders, for the default values and every CI scenario."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.chart_support import ROOT, chartcheck, render_with

SCENARIOS = [s.name for s in chartcheck.scenarios()]
SERVICES = ("rollout", "teacher", "learner", "coordinator")
GRPC_SERVICE_NAMES = {
    "rollout": "asyncopd.v1.RolloutService",
    "teacher": "asyncopd.v1.TeacherService",
    "learner": "asyncopd.v1.LearnerService",
    "coordinator": "asyncopd.v1.CoordinatorService",
}
REQUIRED_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
}
# Selectors are immutable on Deployments/StatefulSets: they may only use labels that never change on upgrade.
IMMUTABLE_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
# Names that hold a credential (ASYNCOPD_API_TOKEN, ..._PASSWORD), not ones that merely count tokens.
SECRETISH = re.compile(r"(?i)(password|passwd|secret|token|api_?key|credential)$")
WORKLOADS = ("Deployment", "StatefulSet")


# -- helpers ----------------------------------------------------------------------------------------------


def objs(manifests, kind):
    return [m for m in manifests if m["kind"] == kind]


def obj(manifests, kind, component):
    found = [
        m
        for m in objs(manifests, kind)
        if m["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"expected one {kind} for {component}, found {len(found)}"
    return found[0]


def service(manifests, component):
    """The ClusterIP (not headless) Service of a component."""
    found = [
        m
        for m in objs(manifests, "Service")
        if m["metadata"]["labels"]["app.kubernetes.io/component"] == component
        and m["spec"].get("clusterIP") != "None"
    ]
    assert len(found) == 1, f"expected one ClusterIP Service for {component}, found {len(found)}"
    return found[0]


def workload(manifests, component):
    found = [
        m
        for m in manifests
        if m["kind"] in WORKLOADS and m["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"expected one workload for {component}"
    return found[0]


def container(w):
    return w["spec"]["template"]["spec"]["containers"][0]


def env_of(c) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def env_value(c, name):
    return env_of(c)[name].get("value")


def pod_specs(manifests):
    for m in manifests:
        if m["kind"] in WORKLOADS:
            yield m, m["spec"]["template"]["spec"]
        elif m["kind"] == "Pod":
            yield m, m["spec"]


def snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()


def values(scenario: str) -> dict:
    base = yaml.safe_load((chartcheck.CHART / "values.yaml").read_text())
    s = chartcheck.scenario(scenario)
    if s.values:
        _merge(base, yaml.safe_load(s.values.read_text()))
    return base


def _merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


# -- every scenario ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_has_the_standard_labels(rendered, scenario):
    for m in rendered[scenario]:
        labels = m["metadata"].get("labels", {})
        missing = REQUIRED_LABELS - labels.keys()
        assert not missing, f"{m['kind']}/{m['metadata']['name']} lacks {sorted(missing)}"
        assert labels["app.kubernetes.io/name"] == "asyncopd"
        assert labels["app.kubernetes.io/instance"] == chartcheck.RELEASE
        assert m["metadata"]["namespace"] in (chartcheck.NAMESPACE, "monitoring")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_use_only_immutable_labels_and_match_their_pods(rendered, scenario):
    manifests = rendered[scenario]
    pods_by_component = {}
    for m in manifests:
        if m["kind"] in WORKLOADS:
            sel = m["spec"]["selector"]["matchLabels"]
            assert set(sel) == IMMUTABLE_LABELS, (
                f"{m['kind']}/{m['metadata']['name']} selects on {sorted(sel)}"
            )
            assert "matchExpressions" not in m["spec"]["selector"]
            pod_labels = m["spec"]["template"]["metadata"]["labels"]
            assert REQUIRED_LABELS <= pod_labels.keys()
            assert sel.items() <= pod_labels.items()
            pods_by_component[sel["app.kubernetes.io/component"]] = pod_labels
    for m in manifests:
        if m["kind"] == "Service":
            sel = m["spec"]["selector"]
        elif m["kind"] == "PodDisruptionBudget":
            sel = m["spec"]["selector"]["matchLabels"]
        else:
            continue
        assert set(sel) <= IMMUTABLE_LABELS, f"{m['kind']}/{m['metadata']['name']} selects on {sorted(sel)}"
        component = sel["app.kubernetes.io/component"]
        assert component in pods_by_component, f"{m['kind']}/{m['metadata']['name']} selects no pods"
        assert sel.items() <= pods_by_component[component].items()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_services_have_native_grpc_probes_on_their_health_service(rendered, scenario):
    manifests = rendered[scenario]
    for component in SERVICES:
        c = container(workload(manifests, component))
        port = int(env_value(c, "ASYNCOPD_GRPC_PORT"))
        assert port in {p["containerPort"] for p in c["ports"] if p["name"] == "grpc"}
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port, "service": ""}, f"{component} {probe}"
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": GRPC_SERVICE_NAMES[component]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["periodSeconds"] >= 1 and c[probe]["failureThreshold"] >= 1


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_are_non_root_with_grace_periods_and_pinned_images(rendered, scenario):
    for m, spec in pod_specs(rendered[scenario]):
        name = f"{m['kind']}/{m['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        if m["kind"] != "Pod":
            assert isinstance(spec.get("terminationGracePeriodSeconds"), int), name
        for c in spec["containers"]:
            image = c["image"]
            assert re.search(r"(:[\w][\w.-]*|@sha256:[a-f0-9]{64})$", image.split("/")[-1]), (
                f"{name}: {image}"
            )
            assert not image.endswith(":latest"), f"{name}: {image}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert "resources" in c, name


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_values_in_plain_env(rendered, scenario):
    manifests = rendered[scenario]
    assert not objs(manifests, "Secret"), (
        "the chart must not create Secrets (it only references existing ones)"
    )
    for m, spec in pod_specs(manifests):
        for c in spec["containers"]:
            for e in c.get("env", []):
                where = f"{m['metadata']['name']}/{c['name']} env {e['name']}"
                if SECRETISH.search(e["name"]):
                    assert "value" not in e, f"{where} carries a secret as a plain value"
                    assert "secretKeyRef" in e["valueFrom"], where
                value = str(e.get("value", ""))
                assert not re.search(r"://[^/\s]*@", value), f"{where} has credentials in a URL"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_ports_target_named_container_ports(rendered, scenario):
    manifests = rendered[scenario]
    ports = {}
    for m in manifests:
        if m["kind"] in WORKLOADS:
            comp = m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
            ports[comp] = {
                p["name"]: p["containerPort"]
                for c in m["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
    for svc in objs(manifests, "Service"):
        comp = svc["spec"]["selector"]["app.kubernetes.io/component"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports[comp], f"Service {svc['metadata']['name']} port {p['name']}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_maps_one_to_one_onto_asyncopd_env(rendered, scenario):
    """Every `<component>.config.<key>` becomes ASYNCOPD_<KEY> with the same value."""
    v = values(scenario)
    manifests = rendered[scenario]
    for component in SERVICES:
        env = env_of(container(workload(manifests, component)))
        for key, value in v[component]["config"].items():
            name = f"ASYNCOPD_{snake(key)}"
            assert name in env, f"{component}.config.{key} is not exported as {name}"
            expected = str(value).lower() if isinstance(value, bool) else str(value)
            assert env[name]["value"] == expected, f"{name}={env[name]['value']!r}, values say {value!r}"
        assert env["ASYNCOPD_DATA_DIR"]["value"] == v["persistence"]["mountPath"]
        assert "ASYNCOPD_REDIS_URL" in env


def settings_classes() -> dict:
    from services.coordinator.settings import CoordinatorSettings
    from services.learner.settings import LearnerSettings
    from services.rollout.settings import RolloutSettings
    from services.teacher.settings import TeacherSettings

    return {"rollout": RolloutSettings, "teacher": TeacherSettings, "learner": LearnerSettings,
            "coordinator": CoordinatorSettings}


# Settings the chart deliberately does not set, and why.
NOT_IN_CHART = {
    "instance": "defaults to the pod's hostname-pid, unique per pod",
    "synthetic_latency_s": "benchmark instrument (synthetic engine), never deployed",
    "synthetic_step_s": "benchmark instrument (padded learner step), never deployed",
    "k8s_api_url": "in a pod the service-account defaults are right",
    "k8s_token_file": "in a pod the service-account defaults are right",
    "k8s_ca_file": "in a pod the service-account defaults are right",
    "log_dir": "logs of locally started rollout workers (the local pool backend only)",
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_asyncopd_env_names_are_settings_fields(rendered, scenario):
    """A misspelt ASYNCOPD_ variable would be ignored silently (extra="ignore"): each must be a field."""
    for component, cls in settings_classes().items():
        fields = {f"ASYNCOPD_{name.upper()}" for name in cls.model_fields}
        names = {
            n for n in env_of(container(workload(rendered[scenario], component))) if n.startswith("ASYNCOPD_")
        }
        unknown = names - fields
        assert not unknown, f"{component} sets {sorted(unknown)}, which {cls.__name__} does not read"


def test_every_setting_is_set_by_the_chart(rendered):
    """The other direction: each settings field is an env var of its workload in some scenario (from `config`
    or derived from chart-level values, such as the Redis password Secret), unless NOT_IN_CHART says why not."""
    for component, cls in settings_classes().items():
        env = set().union(*(env_of(container(workload(rendered[s], component))) for s in SCENARIOS))
        missing = [name for name in cls.model_fields
                   if f"ASYNCOPD_{name.upper()}" not in env and name not in NOT_IN_CHART]
        assert not missing, f"{component}: {missing} have no Helm value"


# -- GPUs -------------------------------------------------------------------------------------------------


def gpu_resources(c) -> dict[str, tuple]:
    res = c.get("resources", {})
    names = {k for part in ("limits", "requests") for k in res.get(part, {}) if "/" in k}
    return {k: (res.get("limits", {}).get(k), res.get("requests", {}).get(k)) for k in names}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu_requests_follow_values(rendered, scenario):
    v = values(scenario)
    for component in ("rollout", "teacher", "learner"):
        c = container(workload(rendered[scenario], component))
        gpus, name = v[component]["gpus"], v[component]["gpuResourceName"]
        if gpus:
            assert gpu_resources(c) == {name: (gpus, gpus)}, component
        else:
            assert gpu_resources(c) == {}, component
    assert gpu_resources(container(workload(rendered[scenario], "coordinator"))) == {}


def test_gpu_scenario_uses_mig_slices_runtime_class_and_tolerations(rendered):
    m = rendered["gpu"]
    rollout = workload(m, "rollout")
    assert gpu_resources(container(rollout)) == {"nvidia.com/mig-3g.40gb": (1, 1)}
    assert gpu_resources(container(workload(m, "teacher"))) == {"nvidia.com/gpu": (2, 2)}
    assert gpu_resources(container(workload(m, "learner"))) == {"nvidia.com/gpu": (8, 8)}
    for component in ("rollout", "teacher", "learner"):
        spec = workload(m, component)["spec"]["template"]["spec"]
        assert spec["runtimeClassName"] == "nvidia"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert rollout["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"
    }
    assert rollout["spec"]["replicas"] == 4


def test_cpu_scenario_requests_no_gpus(rendered):
    for m in rendered["cpu"]:
        if m["kind"] in WORKLOADS:
            for c in m["spec"]["template"]["spec"]["containers"]:
                assert gpu_resources(c) == {}, m["metadata"]["name"]
    assert env_value(container(workload(rendered["cpu"], "rollout")), "ASYNCOPD_DEVICE") == "cpu"


# -- learner ----------------------------------------------------------------------------------------------


def test_single_rank_learner_uses_the_image_entrypoint(rendered):
    m = rendered["default"]
    sts = workload(m, "learner")
    assert sts["kind"] == "StatefulSet"
    assert "command" not in container(sts) and "args" not in container(sts)
    headless = [s for s in objs(m, "Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert len(headless) == 1
    assert headless[0]["spec"]["clusterIP"] == "None"
    assert headless[0]["spec"]["publishNotReadyAddresses"] is True


def test_multirank_learner_runs_torchrun_with_a_c10d_rendezvous_on_pod_0(rendered):
    m = rendered["multirank-learner"]
    sts = workload(m, "learner")
    c = container(sts)
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    cmd = c["command"]
    assert cmd[0] == "torchrun" and cmd[-2:] == ["-m", "services.learner"]
    assert "--nnodes=2" in cmd and "--nproc_per_node=8" in cmd and "--rdzv_backend=c10d" in cmd
    endpoint = next(a.split("=", 1)[1] for a in cmd if a.startswith("--rdzv_endpoint="))
    host, port = endpoint.rsplit(":", 1)
    name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
    assert host == f"{name}-0.{svc}.{chartcheck.NAMESPACE}.svc.cluster.local"
    assert int(port) in {p["containerPort"] for p in c["ports"]}
    assert env_value(c, "ASYNCOPD_ZERO_STAGE") == "3"
    assert gpu_resources(c) == {"nvidia.com/gpu": (8, 8)}
    headless = next(s for s in objs(m, "Service") if s["metadata"]["name"] == svc)
    assert int(port) in {p["port"] for p in headless["spec"]["ports"]}


# -- weights transport -----------------------------------------------------------------------------------

NCCL_ENV = {
    "rollout": {"ASYNCOPD_WEIGHTS_TRANSPORT": "nccl", "ASYNCOPD_WEIGHTS_FALLBACK": "filesystem",
                "ASYNCOPD_WEIGHTS_TRANSFER_TIMEOUT_S": "120", "ASYNCOPD_WEIGHTS_TRANSFER_JOIN_S": "10"},
    "learner": {"ASYNCOPD_WEIGHTS_TRANSPORT": "nccl", "ASYNCOPD_WEIGHTS_FALLBACK": "filesystem",
                "ASYNCOPD_WEIGHTS_TRANSFER_TIMEOUT_S": "120", "ASYNCOPD_WEIGHTS_TRANSFER_PORT": "29700"},
}


def test_nccl_transport_reaches_both_workloads(rendered):
    m = rendered["nccl"]
    for component, expected in NCCL_ENV.items():
        c = container(workload(m, component))
        assert {k: env_value(c, k) for k in expected} == expected, component
    # Rank 0 advertises its transfer rounds at its pod IP.
    assert env_of(container(workload(m, "learner")))["ASYNCOPD_POD_IP"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "status.podIP"}
    }


def test_nccl_transfer_port_is_declared_on_the_learner_only_with_nccl(rendered):
    sts = workload(rendered["nccl"], "learner")
    assert {"name": "weights-xfer", "containerPort": 29700, "protocol": "TCP"} in container(sts)["ports"]
    (headless,) = [s for s in objs(rendered["nccl"], "Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    xfer = {"name": "weights-xfer", "port": 29700, "targetPort": "weights-xfer", "protocol": "TCP"}
    assert xfer in headless["spec"]["ports"]
    for scenario in ("default", "multirank-learner"):
        m = rendered[scenario]
        assert env_value(container(workload(m, "learner")), "ASYNCOPD_WEIGHTS_TRANSPORT") != "nccl"
        names = {p["name"] for p in container(workload(m, "learner"))["ports"]}
        names |= {p["name"] for s in objs(m, "Service") for p in s["spec"]["ports"]}
        assert "weights-xfer" not in names, scenario


def test_nccl_transfer_port_0_picks_a_free_port_and_declares_none():
    p = render_with(
        "-f", str(chartcheck.scenario("nccl").values), "--set", "learner.config.weightsTransferPort=0"
    )
    assert p.returncode == 0, p.stderr
    m = chartcheck.manifests(p.stdout)
    c = container(workload(m, "learner"))
    assert env_value(c, "ASYNCOPD_WEIGHTS_TRANSFER_PORT") == "0"
    assert "weights-xfer" not in {port["name"] for port in c["ports"]}


# -- coordinator, RBAC, ingress ----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_coordinator_role_allows_exactly_scaling_the_pools(rendered, scenario):
    m = rendered[scenario]
    if not values(scenario)["coordinator"]["rbac"]["create"]:
        assert not objs(m, "Role") and not objs(m, "RoleBinding") and not objs(m, "ServiceAccount")
        sa = values(scenario)["coordinator"]["serviceAccount"]["name"]
        assert workload(m, "coordinator")["spec"]["template"]["spec"]["serviceAccountName"] == sa
        return
    role = obj(m, "Role", "coordinator")
    rollout, teacher = workload(m, "rollout"), workload(m, "teacher")
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": [rollout["metadata"]["name"], teacher["metadata"]["name"]],
            "verbs": ["get", "patch", "update"],
        }
    ]
    binding = obj(m, "RoleBinding", "coordinator")
    sa = obj(m, "ServiceAccount", "coordinator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": chartcheck.NAMESPACE}
    ]
    coord = workload(m, "coordinator")
    assert coord["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert coord["spec"]["replicas"] == 1 and coord["spec"]["strategy"]["type"] == "Recreate"
    c = container(coord)
    assert env_value(c, "ASYNCOPD_POOL_BACKEND") == "kubernetes"
    assert env_value(c, "ASYNCOPD_HTTP_HOST") == "0.0.0.0"
    assert env_value(c, "ASYNCOPD_K8S_ROLLOUT_DEPLOYMENT") == rollout["metadata"]["name"]
    assert env_of(c)["ASYNCOPD_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_external_redis_scenario_wires_secrets_and_ingress(rendered):
    m = rendered["external-redis"]
    assert not [x for x in m if x["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]
    for component in SERVICES:
        env = env_of(container(workload(m, component)))
        assert env["ASYNCOPD_REDIS_URL"]["value"] == "rediss://redis.prod.example.com:6380/2"
        assert env["ASYNCOPD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "asyncopd-redis",
            "key": "password",
        }
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        data = next(
            vol
            for vol in workload(m, component)["spec"]["template"]["spec"]["volumes"]
            if vol["name"] == "data"
        )
        assert data["persistentVolumeClaim"]["claimName"] == "shared-llm-data"
    assert not objs(m, "PersistentVolumeClaim")
    coord = env_of(container(workload(m, "coordinator")))
    assert coord["ASYNCOPD_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "asyncopd-api",
        "key": "token",
    }
    ingress = obj(m, "Ingress", "coordinator")
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert path["backend"]["service"] == {
        "name": workload(m, "coordinator")["metadata"]["name"],
        "port": {"name": "http"},
    }
    assert ingress["spec"]["tls"][0]["secretName"] == "asyncopd-tls"


# -- Redis, storage --------------------------------------------------------------------------------------


def test_builtin_redis_keeps_an_aof_on_a_pvc_and_never_evicts(rendered):
    m = rendered["default"]
    sts = workload(m, "redis")
    c = container(sts)
    assert re.fullmatch(r"docker\.io/library/redis:7\.\d+\.\d+(-\w+)?", c["image"])
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "redis-data"
    assert {"name": "redis-data", "mountPath": "/data"} in c["volumeMounts"]
    assert c["readinessProbe"]["exec"] and c["livenessProbe"]["tcpSocket"]
    url = env_value(container(workload(m, "rollout")), "ASYNCOPD_REDIS_URL")
    svc = service(m, "redis")
    assert url == f"redis://{svc['metadata']['name']}:6379/0"


def test_redis_password_comes_from_the_secret(rendered):
    c = container(workload(rendered["keda"], "redis"))
    assert "$(REDIS_PASSWORD)" not in c["args"] and '"$REDIS_PASSWORD"' in c["command"][2]  # stdin, not argv
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "asyncopd-redis"
    assert env_of(c)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "asyncopd-redis"
    rollout_env = env_of(container(workload(rendered["keda"], "rollout")))
    assert rollout_env["ASYNCOPD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "asyncopd-redis"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_service_mounts_the_shared_data_volume(rendered, scenario):
    v = values(scenario)
    for component in SERVICES:
        w = workload(rendered[scenario], component)
        assert {"name": "data", "mountPath": v["persistence"]["mountPath"]} in container(w)["volumeMounts"]
    pvcs = objs(rendered[scenario], "PersistentVolumeClaim")
    if not v["persistence"]["enabled"]:
        assert not pvcs
        for component in SERVICES:
            vols = workload(rendered[scenario], component)["spec"]["template"]["spec"]["volumes"]
            assert next(x for x in vols if x["name"] == "data") == {"name": "data", "emptyDir": {}}
    elif v["persistence"]["existingClaim"]:
        assert not pvcs
    else:
        (pvc,) = pvcs
        assert pvc["spec"]["accessModes"] == v["persistence"]["accessModes"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_default_data_volume_is_read_write_many(rendered):
    (pvc,) = objs(rendered["default"], "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# -- autoscaling, disruption budgets ----------------------------------------------------------------------


KEDA_REDIS_STREAMS_KEYS = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "username",
    "usernameFromEnv",
    "password",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "activationValue",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
}


def test_keda_scales_the_rollout_pool_on_the_active_prompts_stream(rendered):
    m = rendered["keda"]
    (so,) = objs(m, "ScaledObject")
    rollout = workload(m, "rollout")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": rollout["metadata"]["name"],
    }
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 16)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert set(meta) <= KEDA_REDIS_STREAMS_KEYS
    assert all(isinstance(x, str) for x in meta.values()), "KEDA trigger metadata values must be strings"
    assert meta["stream"] == "asyncopd:prompts" and meta["consumerGroup"] == "rollout"
    assert meta["lagCount"] == "32" and meta["activationLagCount"] == "1"
    redis_svc = service(m, "redis")["metadata"]["name"]
    assert meta["address"] == f"{redis_svc}.{chartcheck.NAMESPACE}.svc.cluster.local:6379"
    (auth,) = objs(m, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "asyncopd-redis", "key": "redis-password"}
    ]
    assert "replicas" not in rollout["spec"], "KEDA owns the replica count"
    assert not objs(m, "HorizontalPodAutoscaler")


def test_without_keda_the_pools_can_use_hpas(rendered):
    m = rendered["keda-off-hpa"]
    assert not objs(m, "ScaledObject")
    for component, (lo, hi) in {"rollout": (2, 6), "teacher": (1, 3)}.items():
        hpa = obj(m, "HorizontalPodAutoscaler", component)
        w = workload(m, component)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": w["metadata"]["name"],
        }
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (lo, hi)
        assert "replicas" not in w["spec"]


def test_defaults_create_no_autoscalers_or_operator_objects(rendered):
    kinds = {m["kind"] for m in rendered["default"]}
    assert not kinds & {
        "ScaledObject",
        "TriggerAuthentication",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "Ingress",
    }
    assert {"PodDisruptionBudget", "Role", "RoleBinding", "ServiceAccount", "PersistentVolumeClaim"} <= kinds


def test_disruption_budgets_protect_the_pools_and_the_learner(rendered):
    m = rendered["default"]
    assert obj(m, "PodDisruptionBudget", "rollout")["spec"]["maxUnavailable"] == 1
    assert obj(m, "PodDisruptionBudget", "teacher")["spec"]["maxUnavailable"] == 1
    assert obj(m, "PodDisruptionBudget", "learner")["spec"]["maxUnavailable"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "rollout.keda.enabled=true"], "keda.sh/v1alpha1"),
        (["--set", "metrics.serviceMonitor.enabled=true"], "monitoring.coreos.com/v1/ServiceMonitor"),
        (["--set", "metrics.podMonitor.enabled=true"], "monitoring.coreos.com/v1/PodMonitor"),
        (["--set", "metrics.prometheusRule.enabled=true"], "monitoring.coreos.com/v1/PrometheusRule"),
    ],
)
def test_crd_objects_are_gated_on_the_cluster_capabilities(args, message):
    p = render_with(*args)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    kind = message.rsplit("/", 1)[-1] if "monitoring" in message else "ScaledObject"
    api = message if "monitoring" in message else "keda.sh/v1alpha1/ScaledObject"
    p = render_with(*args, "--api-versions", api)
    assert p.returncode == 0, p.stderr
    assert f"kind: {kind}" in p.stdout


# -- monitoring, dashboards, example job -------------------------------------------------------------------


def test_monitoring_scenario_scrapes_every_service_and_ships_alerts(rendered):
    m = rendered["monitoring"]
    (smon,) = objs(m, "ServiceMonitor")
    assert smon["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    comps = smon["spec"]["selector"]["matchExpressions"][0]["values"]
    assert sorted(comps) == sorted(SERVICES)
    assert smon["spec"]["endpoints"][0]["port"] == "metrics"
    for svc in objs(m, "Service"):
        comp = svc["spec"]["selector"]["app.kubernetes.io/component"]
        if comp in SERVICES:
            assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}, svc["metadata"]["name"]
    (rule,) = objs(m, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "AsyncopdStaleDropsHigh",
        "AsyncopdStreamLagGrowing",
        "AsyncopdLearnerStalled",
        "AsyncopdLearnerAbsent",
        "AsyncopdDeadLetters",
    }


def test_podmonitor_selects_the_metrics_port_of_every_service(rendered):
    (pmon,) = objs(rendered["keda"], "PodMonitor")
    assert pmon["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert sorted(pmon["spec"]["selector"]["matchExpressions"][0]["values"]) == sorted(SERVICES)
    for component in SERVICES:
        names = {p["name"] for p in container(workload(rendered["keda"], component))["ports"]}
        assert "metrics" in names, component


@pytest.mark.parametrize("scenario", ["default", "monitoring"])
def test_dashboards_ship_in_configmaps_for_the_grafana_sidecar(rendered, scenario):
    files = sorted((chartcheck.CHART / "dashboards").glob("*.json"))
    cms = [
        m
        for m in objs(rendered[scenario], "ConfigMap")
        if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert len(cms) == len(files) == 5
    shipped = {k: v for cm in cms for k, v in cm["data"].items()}
    assert set(shipped) == {f.name for f in files}
    for f in files:
        assert json.loads(shipped[f.name]) == json.loads(f.read_text())
    expected_ns = "monitoring" if scenario == "monitoring" else chartcheck.NAMESPACE
    assert {cm["metadata"]["namespace"] for cm in cms} == {expected_ns}
    assert all(len(json.dumps(cm["data"])) < 1_000_000 for cm in cms)


def test_example_job_is_a_valid_job_spec(rendered):
    from asyncopd.jobspec import JobSpec

    cm = obj(rendered["default"], "ConfigMap", "example-job")
    JobSpec.model_validate(json.loads(cm["data"]["job.json"]))
    mounts = container(workload(rendered["default"], "coordinator"))["volumeMounts"]
    assert {"name": "jobs", "mountPath": "/etc/asyncopd/jobs", "readOnly": True} in mounts


def test_helm_test_hook_checks_the_coordinator(rendered):
    (pod,) = objs(rendered["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/readyz" in pod["spec"]["containers"][0]["command"][-1]


def test_notes_tell_how_to_reach_the_api_and_submit_a_job(chart_tools):
    p = chartcheck.run(
        [
            str(chartcheck.HELM),
            "install",
            "ci",
            str(chartcheck.CHART),
            "--namespace",
            chartcheck.NAMESPACE,
            "--dry-run=client",
        ]
    )
    assert p.returncode == 0, p.stderr
    notes = p.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/ci-asyncopd-coordinator 8000:8000" in notes
    assert "POST $ASYNCOPD_API_URL/v1/jobs" in notes
    assert "PUT $ASYNCOPD_API_URL/v1/pools/rollout" in notes


def test_chart_readme_commands_name_real_paths():
    text = (ROOT / "deploy" / "README.md").read_text()
    for path in re.findall(r"(?<![\w/])(deploy/[\w./-]+\.(?:yaml|json|mk|py|sh))", text):
        assert (ROOT / path).exists(), path
