"""The Dockerfiles, checked without a container engine: pinned multi-stage bases, a non-root user, COPY
sources that exist and are not excluded by .dockerignore, entrypoints that name existing modules."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart_support import ROOT, chartcheck, deploy_script

DOCKER = ROOT / "docker"
SERVICES = ("coordinator", "rollout", "teacher", "learner")
DEFAULT_GRPC_PORTS = {"coordinator": 50050, "rollout": 50051, "teacher": 50052, "learner": 50053}
# Files the Python side of the project provides; until they exist a check on them is skipped, not failed.
PROVIDED_BY_THE_SERVICES = {"README.md", *(f"services/{s}/__main__.py" for s in SERVICES)}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf = f"{buf} {line[:-1].strip()}" if line.endswith("\\") else f"{buf} {line}"
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def resolve_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def stages(path: Path) -> list[str]:
    """Base images of every FROM, with ARG defaults substituted (stage aliases resolved)."""
    args, aliases, bases = {}, {}, []
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest and not bases:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = resolve_args(parts[0], args)
            image = aliases.get(image, image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                aliases[parts[2]] = image
            bases.append(image)
    return bases


def _docker_pattern(pat: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**/` is zero or more directories, `*`/`?` stay within one."""
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers its contents."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        regex = _docker_pattern(pat.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def copy_sources(path: Path) -> list[str]:
    out = []
    for word, rest in instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        parts = shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        out.extend(parts[:-1])
    return out


def entrypoint(path: Path) -> list[str]:
    eps = [rest for word, rest in instructions(path) if word == "ENTRYPOINT"]
    assert eps, f"{path.name} has no ENTRYPOINT"
    return json.loads(eps[-1])


def test_one_dockerfile_per_service():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(f"{s}.Dockerfile" for s in SERVICES)
    assert (DOCKER / "README.md").exists()


@pytest.mark.parametrize("service", SERVICES)
def test_bases_are_pinned_and_multi_stage(service):
    bases = stages(DOCKER / f"{service}.Dockerfile")
    assert len(bases) >= 2, "build and runtime stages"
    for image in bases:
        assert "$" not in image, f"unresolved base {image}"
        name = image.split("/")[-1]
        assert ":" in name or "@sha256:" in image, f"{image} has no tag"
        tag = name.split(":", 1)[1] if ":" in name else ""
        assert tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned to a version"


def test_bases_are_the_documented_ones():
    readme = (DOCKER / "README.md").read_text()
    for service in SERVICES:
        for image in stages(DOCKER / f"{service}.Dockerfile"):
            assert f"`{image}`" in readme, f"docker/README.md does not mention {image}"
    assert "vllm/vllm-openai" in stages(DOCKER / "rollout.Dockerfile")[-1]
    assert "vllm/vllm-openai" in stages(DOCKER / "teacher.Dockerfile")[-1]
    assert stages(DOCKER / "learner.Dockerfile")[-1].startswith("nvidia/cuda:")
    assert stages(DOCKER / "coordinator.Dockerfile")[-1].startswith("python:3.11")


def test_coordinator_image_installs_no_torch():
    text = " ".join(f"{w} {r}" for w, r in instructions(DOCKER / "coordinator.Dockerfile")).lower()
    assert "torch" not in text and "vllm" not in text and "deepspeed" not in text
    assert "[learner]" not in text and "[vllm" not in text


@pytest.mark.parametrize("service", SERVICES)
def test_runs_as_a_non_root_user(service):
    users = [rest for word, rest in instructions(DOCKER / f"{service}.Dockerfile") if word == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001", "the chart's podSecurityContext runs as 10001"


@pytest.mark.parametrize(
    ("service", "source"), [(s, src) for s in SERVICES for src in copy_sources(DOCKER / f"{s}.Dockerfile")]
)
def test_copy_sources_exist_and_reach_the_build_context(service, source):
    path = ROOT / source
    if not path.exists() and source in PROVIDED_BY_THE_SERVICES:
        pytest.skip(f"{source} is not in the tree yet")
    assert path.exists(), f"{service}.Dockerfile copies {source}, which does not exist"
    assert not dockerignore_excludes(source), f".dockerignore excludes {source}"
    if path.is_dir():
        files = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, f"{source} holds no Python files"
        assert not dockerignore_excludes(str(files[0].relative_to(ROOT)))


@pytest.mark.parametrize("service", SERVICES)
def test_entrypoint_is_the_python_m_module(service):
    assert entrypoint(DOCKER / f"{service}.Dockerfile") == ["python", "-m", f"services.{service}"]
    main = ROOT / "services" / service / "__main__.py"
    if not main.exists():
        pytest.skip(f"{main.relative_to(ROOT)} is not in the tree yet")
    assert main.is_file()


@pytest.mark.parametrize("service", SERVICES)
def test_exposes_the_default_ports(service):
    exposed = {
        int(p)
        for word, rest in instructions(DOCKER / f"{service}.Dockerfile")
        if word == "EXPOSE"
        for p in rest.split()
    }
    assert {DEFAULT_GRPC_PORTS[service], 9400} <= exposed


def test_dockerignore_keeps_secrets_and_caches_out():
    for path in (
        ".venv/bin/python",
        ".git/config",
        ".tools/bin/helm",
        ".cache/models/x",
        ".run/data/x",
        "tests/unit/test_x.py",
        "asyncopd/__pycache__/x.pyc",
    ):
        assert dockerignore_excludes(path), path
    for path in ("pyproject.toml", "asyncopd/streams.py", "services/rollout/worker.py"):
        assert not dockerignore_excludes(path), path


def test_model_images_install_the_ml_extra_beyond_their_cuda_stack():
    """The learner and rollout images install the `ml` extra's packages by name (the extra itself pins the
    development machines' CPU torch): a package added to the extra must be added to their pip installs too."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ml"]
    names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() for req in extra}
    cuda_stack = {"torch", "transformers", "safetensors", "numpy"}  # the CUDA builds: from the base image or pinned
    for service in ("learner", "rollout"):
        installed = {word.strip('"').lower() for kind, rest in instructions(DOCKER / f"{service}.Dockerfile")
                     if kind == "RUN" and "pip install" in rest for word in shlex.split(rest, posix=False)}
        assert names - cuda_stack <= installed, (service, names - cuda_stack - installed)


def test_chart_images_are_the_ones_make_images_builds():
    values = yaml.safe_load((chartcheck.CHART / "values.yaml").read_text())
    mk = (ROOT / "deploy" / "chart.mk").read_text()
    prefix = re.search(r"^IMAGE_PREFIX \?= (\S+)", mk, re.M).group(1)
    for service in SERVICES:
        assert values[service]["image"]["repository"] == f"{prefix}-{service}"


def from_args(path: Path) -> set[str]:
    """The ARGs a FROM instruction names: the base images."""
    return {m for word, rest in instructions(path) if word == "FROM" for m in re.findall(r"\$\{?(\w+)", rest)}


def declared_args(path: Path) -> set[str]:
    return {rest.split("=", 1)[0] for word, rest in instructions(path) if word == "ARG"}


@pytest.mark.parametrize("service", SERVICES)
def test_cpu_variant_changes_only_the_bases_and_the_engine(service):
    """The images check builds the CPU variants from these same Dockerfiles; what may differ from the CUDA
    images is the base images (ARGs used in FROM) and the engine's version (the learner's torch and the vLLM
    build its weight transfer comes from), nothing else: every other step is shared."""
    imagescheck = deploy_script("imagescheck")
    path = DOCKER / f"{service}.Dockerfile"
    overrides = set(imagescheck.CPU_VARIANT[service])
    assert overrides <= declared_args(path), f"{service}: build args the Dockerfile does not declare"
    assert overrides <= from_args(path) | {"TORCH_VERSION", "VLLM_SPEC"}, overrides - from_args(path)


def test_image_bases_of_the_check_stand_in_for_registry_images_only():
    """docker/local holds the stand-ins for bases no registry serves here, never a service image."""
    local = sorted(p.name for p in (DOCKER / "local").glob("*.Dockerfile"))
    assert local == ["python.Dockerfile", "vllm-cpu.Dockerfile"]
    for name in local:
        assert not [w for w, _ in instructions(DOCKER / "local" / name) if w in ("ENTRYPOINT", "COPY", "ADD")]


@pytest.mark.parametrize("path", sorted([*DOCKER.glob("*.Dockerfile"), *DOCKER.glob("local/*.Dockerfile")]),
                         ids=lambda p: str(p.relative_to(DOCKER)))
def test_hadolint(path):
    hadolint = Path(sys.executable).parent / "hadolint"
    p = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
