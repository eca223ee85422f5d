# The two commands of the README. Both set up everything they need on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test venv

$(BIN)/raftmail: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/raftmail

venv: $(BIN)/raftmail

# A local 3-node cluster from cluster.example.toml; deliveries go to a local capture sink.
run: venv
	$(BIN)/raftmail up --config cluster.example.toml --with-sink

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider
