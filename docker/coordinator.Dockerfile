# syntax=docker/dockerfile:1
# Coordinator: REST API, job queue, admission control, pool scaling. Base dependencies only (no torch), so
# the image stays small. Build from the repository root:
#   docker build -f docker/coordinator.Dockerfile -t ghcr.io/asyncopd/asyncopd-coordinator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: a virtualenv with asyncopd and its base dependencies ------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so source edits do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY asyncopd ./asyncopd
COPY services ./services
# asyncopd as a wheel, installed in the runtime stage: the virtualenv above stays byte-identical across source
# edits, so its layer is reused and a rebuild after a source change copies only the wheel.
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime -------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 asyncopd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/asyncopd --create-home asyncopd \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('services.coordinator.__main__') is None)"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ASYNCOPD_DATA_DIR=/data \
    ASYNCOPD_HTTP_HOST=0.0.0.0
WORKDIR /home/asyncopd
USER 10001:10001
# REST, gRPC, metrics.
EXPOSE 8000 50050 9400
ENTRYPOINT ["python", "-m", "services.coordinator"]
