# The two commands: `make run` (set up, build the demo zoo, merge, serve) and `make test`.
.PHONY: setup run test zoo clean

VENV := .venv
BIN := $(VENV)/bin

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/vitmerge serve

test: setup
	$(BIN)/python -m pytest -q

zoo: setup
	$(BIN)/vitmerge zoo build --preset tiny

clean:
	rm -rf $(VENV) store .pytest_cache
