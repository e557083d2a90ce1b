# syntax=docker/dockerfile:1
# Learner: DeepSpeed training on CUDA, one process per GPU under torchrun (the chart's multi-rank mode) or
# a single `python -m services.learner`. torch is the PyPI CUDA 13 build pinned to the version vLLM 0.33
# uses in the rollout/teacher images, so every service runs the same torch. Build from the repository root:
#   docker build -f docker/learner.Dockerfile -t ghcr.io/asyncopd/asyncopd-learner:0.1.0 .
# Pass --build-arg DS_BUILD_OPS=1 to precompile DeepSpeed's CUDA ops (fused Adam, CPU Adam for offload)
# in the devel stage; by default none are needed (the learner passes a torch optimizer).
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---- build: a virtualenv with torch, DeepSpeed, transformers and asyncopd -------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS build
ARG TORCH_VERSION=2.14.0
ARG DEEPSPEED_VERSION=0.19.8
ARG TRANSFORMERS_SPEC="transformers>=5.16.1,<5.21"
# The trainer side of the `nccl` weights transport is vLLM's weight-transfer engine (the learner serves no model
# with it): the rollout image's vLLM version, so both sides speak the same protocol.
ARG VLLM_SPEC="vllm==0.33.0"
ARG DS_BUILD_OPS=0
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# zstandard + xxhash: the `delta` weights transport; peft: LoRA students (the `ml` extra, which pins the CPU
# torch, is not used). vLLM's vision dependencies go: the learner trains text models, and on CPU a torchvision
# built for another torch breaks `from transformers import LlamaForCausalLM` (torchvision::nms).
RUN pip install "torch==${TORCH_VERSION}" "${VLLM_SPEC}" "${TRANSFORMERS_SPEC}" safetensors numpy zstandard xxhash \
        peft setuptools wheel \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
# DeepSpeed's setup.py inspects the installed torch, hence --no-build-isolation. DS_BUILD_OPS and
# TORCH_CUDA_ARCH_LIST reach it as build arguments (a RUN sees the stage's ARGs in its environment).
RUN DS_BUILD_FUSED_ADAM=${DS_BUILD_OPS} DS_BUILD_CPU_ADAM=${DS_BUILD_OPS} pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY asyncopd ./asyncopd
COPY services ./services
# asyncopd as a wheel, installed in the runtime stage: the virtualenv above stays byte-identical across source
# edits, so its (large) layer is reused and a rebuild after a source change copies only the wheel.
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: CUDA base (driver libraries come from the node; CUDA/NCCL/cuDNN libraries from the wheels) -
FROM ${CUDA_RUNTIME_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 asyncopd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/asyncopd --create-home asyncopd \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /wheels /wheels
# No extras: [learner] pins the CPU torch of the development machines; the CUDA stack is installed above.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('services.learner.__main__') is None)"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/asyncopd \
    XDG_CACHE_HOME=/home/asyncopd/.cache \
    ASYNCOPD_DATA_DIR=/data \
    ASYNCOPD_DEVICE=cuda
WORKDIR /home/asyncopd
USER 10001:10001
# gRPC, metrics, torchrun c10d rendezvous.
EXPOSE 50053 9400 29400
ENTRYPOINT ["python", "-m", "services.learner"]
