# rayalign: `make demo` and `make test` work from a clean clone on a fresh machine.
# They create .venv when missing and install the pinned stack (CPU torch where there is no NVIDIA GPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Re-install only when the dependency files change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-12)
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS ?= dev
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_NVIDIA),)
	# No NVIDIA GPU: the CPU build of torch (a local wheel on these machines; no multi-GB CUDA download).
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
endif
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(PY) -m pipeline.demo configs/tiny.yaml

test: install
	$(PY) -m pytest -q -rs tests

test-fast: install
	$(PY) -m pytest -q -rs -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -rs -m slow tests

clean:
	rm -rf runs .pytest_cache
