# syntax=docker/dockerfile:1
# Stand-in for python:3.11-slim-bookworm where no registry serves base images (the development and CI
# machines): Debian bookworm's own Python 3.11 on a debootstrap root (`localhost/asyncopd-debian`, made by
# deploy/imagescheck.py). Only the images check builds FROM it; real builds use the official image.
ARG DEBIAN_IMAGE=localhost/asyncopd-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
