# Kubernetes delivery targets; the root Makefile does `include deploy/chart.mk`.
#
#   make chart        install the tools when missing, then: helm lint --strict, helm template (defaults +
#                     deploy/helm/ci/*.yaml), kubernetes-validate --strict (k8s 1.27 and 1.37), promtool
#                     check/test rules, dashboard PromQL parse, pytest tests/deploy
#   make chart-tools  only install helm + kubectl (.tools/bin), kubernetes-validate (.venv), promtool (apt)
#   make images       docker build the four service images (needs a container engine)
#
# Variables: CHART_PY (the venv's python, default .venv/bin/python; not PYTHON, which the root Makefile
# uses for the interpreter that creates the venv), TOOLS_DIR (.tools), IMAGE_PREFIX, IMAGE_TAG, DOCKER.

CHART_PY ?= .venv/bin/python
TOOLS_DIR ?= .tools
IMAGE_PREFIX ?= ghcr.io/asyncopd/asyncopd
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"*\([^"]*\)"*/\1/p' deploy/helm/asyncopd/Chart.yaml)
DOCKER ?= docker
IMAGE_SERVICES := coordinator rollout teacher learner

.PHONY: chart chart-tools chart-check chart-test images $(addprefix image-,$(IMAGE_SERVICES))

chart: chart-tools chart-check chart-test

chart-tools:
	@PYTHON=$(CHART_PY) TOOLS_DIR=$(abspath $(TOOLS_DIR)) bash deploy/scripts/install-tools.sh

chart-check: chart-tools
	TOOLS_DIR=$(abspath $(TOOLS_DIR)) $(CHART_PY) deploy/chartcheck.py all

chart-test: chart-tools
	TOOLS_DIR=$(abspath $(TOOLS_DIR)) $(CHART_PY) -m pytest -q tests/deploy

images: $(addprefix image-,$(IMAGE_SERVICES))

$(addprefix image-,$(IMAGE_SERVICES)): image-%:
	@command -v $(DOCKER) >/dev/null 2>&1 || { \
	  echo "make images: '$(DOCKER)' is not installed: building images needs a container engine" >&2; \
	  echo "  (none on the development/CI machines; build on a machine with docker or set DOCKER=podman)" >&2; \
	  exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { \
	  echo "make images: '$(DOCKER)' is installed but no container engine answers ('$(DOCKER) info' failed)" >&2; \
	  exit 1; }
	$(DOCKER) build -f docker/$*.Dockerfile -t $(IMAGE_PREFIX)-$*:$(IMAGE_TAG) .
