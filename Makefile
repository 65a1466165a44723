# Two entry points, both self-installing into .venv/ (reused while pyproject.toml is unchanged):
#   make demo   - install, then run the main job (jobs.pipeline) on the tiny CPU recipe
#   make test   - install, then run the test suite (unit + integration layers)
#   make chaos  - install, then run the chaos layer: every @pytest.mark.chaos test (node loss, vLLM under load,
#                 the benchmarks' --quick runs, ...); prints the whole fault table with make test's rows
#   make ci     - make test, then make chaos: what CI runs (.ci/run)
#   make walkthrough - README "After the demo", every command as written, on a fresh clone (~6 min)
#   make gpu-wheels - here: the wheels a lent GPU machine lacks, into .gpu-wheels/ (carried to it, < 64 MiB)
#   make gpu-smoke - on that GPU machine (its own Python, no registry): a ~0.5B stage-2 step loop, padded vs packed
#   make gpu-smoke-proof - here: gpu-smoke's dry run in a venv of only the GPU machine's packages + the wheels
#   make vllm    - the vLLM engine's own environment in .venv-vllm/ (make test builds it; README "The vLLM engine")
#   make browser - Debian's chromium for the chat page's browser test, when missing (make test runs it)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# infra/install.sh holds the install steps (torch first, at the pin in pyproject.toml, then the
# project with --no-build-isolation); the container image (infra/Dockerfile) runs the same script.
# Set TORCH_INDEX_URL to a CUDA wheel index for GPU machines; the default takes the index's build.
TORCH_INDEX_URL ?=

.PHONY: demo test chaos ci walkthrough gpu-wheels gpu-smoke gpu-smoke-proof install vllm browser lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile infra/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sh infra/install.sh $(PY) test $(TORCH_INDEX_URL)
	touch $(STAMP)

# vLLM requires transformers<5.20, the project pins 5.23: the engine gets an environment of its own, which
# Ray starts the engine actors in (pyproject.toml [dependency-groups] has the pins and the reasons).
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile infra/install-vllm.sh
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	sh infra/install-vllm.sh $(VLLM_VENV)/bin/python cpu
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m jobs.pipeline --recipe tiny_cpu_demo $(ARGS)

# make test saves its fault table rows and layer times here; make chaos prints them with its own
REPORT := outputs/test-report

# the two environments install side by side (each mostly waits on downloads and disk)
test:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(VLLM_STAMP) browser
	$(PY) -m pytest --report-file=$(REPORT)/make-test.json $(PYTEST_ARGS)

# only the chaos-marked tests: make test's fault tests are not run twice (their rows come from its report)
chaos:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(VLLM_STAMP) browser
	$(PY) -m pytest -m chaos --chaos --report-file=$(REPORT)/make-chaos.json \
	    --merge-report=$(REPORT)/make-test.json $(PYTEST_ARGS)

# .ci/run: make test, then make chaos, timed against their budgets
ci:
	bash .ci/run

walkthrough: $(STAMP)
	$(PY) -m pytest tests/walkthrough $(PYTEST_ARGS)

# The lent GPU machine has its own Python (torch, transformers, peft, accelerate), no package registry and
# no Ray: `make gpu-wheels` here, carry .gpu-wheels/ (the device tool's `carry`), `make gpu-smoke` there.
# CI never runs it; gpu-smoke-proof runs its dry run in a venv holding only those packages and the wheels.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_TORCHVISION ?= 0.26.0
gpu-wheels: $(STAMP)
	sh infra/gpu-wheels.sh $(PY) $(GPU_WHEELS) $(GPU_PYTHON_VERSION) $(GPU_TORCHVISION)

gpu-smoke:
	sh infra/gpu-smoke.sh $(GPU_PYTHON) $(GPU_WHEELS) $(ARGS)

gpu-smoke-proof: $(STAMP)
	sh infra/gpu-smoke.sh --proof

# The browser tests drive the system Chromium through Playwright's Python client (no browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium (for the chat page's browser test)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends chromium >/dev/null; }

lint: $(STAMP)
	$(PY) -m ruff check platform jobs pipelines serve tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs runs
