# The two commands: `make run` (set up, build the demo zoo, merge, serve) and `make test`.
.PHONY: setup run test lint zoo clean

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
	$(BIN)/mypy

zoo: setup
	$(BIN)/vitmerge zoo build --preset tiny

clean:
	rm -rf $(VENV) store .pytest_cache
