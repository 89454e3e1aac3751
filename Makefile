# The two commands a new user needs: `make demo` and `make test`. Each one installs what it needs
# (virtual environment, PyTorch's CPU build, this package with its DeepSpeed extra, the etcd-server
# Debian package) and then runs. DS_BUILD_OPS=0: DeepSpeed installs without compiling its ops.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build this project is developed against; any torch>=2.3 works at run time.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# DeepSpeed's ops (the tests' DeepSpeed jobs compile its CPU shared-memory all-reduce, ~40 s)
# are built on first use and cached here, so they compile once per environment.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch-extensions

.PHONY: demo test lint unit integration bench install system-deps clean

demo: $(STAMP)
	$(BIN)/gemini-ckpt demo

test: $(STAMP) lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks tools examples
	$(BIN)/ruff check src tests benchmarks tools examples
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python tools/check_sizes.py src

unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

integration: $(STAMP)
	$(BIN)/pytest -q -m integration

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_snapshot.py --out bench-results/snapshot.json

install: $(STAMP)

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

# etcd is the coordination store of multi-machine jobs; the venv module is missing on minimal Debian.
system-deps:
	@SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	need=""; \
	command -v etcd >/dev/null 2>&1 || need="$$need etcd-server"; \
	$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || need="$$need python3-venv"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages:$$need"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need >/dev/null; \
	fi

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
