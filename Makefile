# The two commands of the README. Both set up everything they need on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the fault tests use (network namespaces, packet filters, skewed clocks). Installed
# only when missing and when running as root with apt; elsewhere those tests skip with a reason.
FAULT_PACKAGES := faketime nftables iptables iproute2

.PHONY: run test venv fault-tools

$(BIN)/raftmail: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/raftmail

venv: $(BIN)/raftmail

fault-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	   ! (command -v faketime && command -v nft && command -v iptables && command -v ip) >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FAULT_PACKAGES) >/dev/null; \
	fi

# A local 3-node cluster from cluster.example.toml; deliveries go to a local capture sink.
run: venv
	$(BIN)/raftmail up --config cluster.example.toml --with-sink

test: venv fault-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider
