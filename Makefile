# The two commands: `make run` (set up, build the demo zoo, merge, serve) and `make test`.
.PHONY: setup run test lint zoo demo-zoo smoke clean

VENV := .venv
BIN := $(VENV)/bin

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/vitmerge serve

test: setup lint
	$(BIN)/python -m pytest -q --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

zoo: setup
	$(BIN)/vitmerge zoo build --preset tiny

# retrain the demo zoo shipped in the package (after changing the `tiny` preset or the training code)
demo-zoo: setup
	$(BIN)/vitmerge zoo build --preset tiny --force --out model_store/embedded_zoos/tiny

# the container test plan (deploy/smoke.sh): build the image, run it, compose with nginx + 2 replicas +
# Prometheus, podman kube play of deploy/k8s; ~9 min here, so not part of `make test`. Needs root (installs podman,
# runc and debootstrap with apt-get when they are missing).
smoke: setup
	bash deploy/smoke.sh

clean:
	rm -rf $(VENV) store .pytest_cache
