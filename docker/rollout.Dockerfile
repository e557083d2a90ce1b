# syntax=docker/dockerfile:1
# Rollout worker: the student generating samples with vLLM on CUDA. Based on vLLM's own image, which
# carries a matching CUDA runtime, torch and vLLM build; asyncopd is installed on top without touching
# any package already there. Build from the repository root:
#   docker build -f docker/rollout.Dockerfile -t ghcr.io/asyncopd/asyncopd-rollout:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

# ---- build: the asyncopd wheel (pure Python) -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY asyncopd ./asyncopd
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: vLLM's CUDA image + asyncopd ----------------------------------------------------------
FROM ${VLLM_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
COPY --from=build /wheels /wheels
# The constraints pin every installed distribution: asyncopd's base dependencies may be added, but the
# image's torch/vLLM/transformers stack cannot be up- or downgraded (the install fails instead).
# zstandard + xxhash: the `delta` weights transport; peft: LoRA adapters on the HF engine (vLLM serves them
# itself) (from the `ml` extra, whose CPU torch pin is not wanted).
RUN python3 -m pip list --format=freeze > /tmp/constraints.txt \
    && python3 -m pip install -c /tmp/constraints.txt /wheels/*.whl zstandard xxhash peft \
    && rm -rf /wheels /tmp/constraints.txt \
    && (command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python) \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('services.rollout.__main__') is None)"
RUN groupadd --system --gid 10001 asyncopd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/asyncopd --create-home asyncopd \
    && mkdir -p /data && chown 10001:10001 /data
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/asyncopd \
    XDG_CACHE_HOME=/home/asyncopd/.cache \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    ASYNCOPD_DATA_DIR=/data \
    ASYNCOPD_ENGINE=vllm \
    ASYNCOPD_DEVICE=cuda
WORKDIR /home/asyncopd
USER 10001:10001
# gRPC, metrics.
EXPOSE 50051 9400
ENTRYPOINT ["python", "-m", "services.rollout"]
