# Two entry points, both self-installing into .venv/ (reused while pyproject.toml is unchanged):
#   make demo   - install, then run the main job (jobs.pipeline) on the tiny CPU recipe
#   make test   - install, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch pin is read from pyproject.toml (the one place pins live). Set TORCH_INDEX_URL to a
# CUDA wheel index for GPU machines; the default takes the CPU build.
TORCH_PIN := $(shell grep -oE '"torch==[^"]+"' pyproject.toml | tr -d '"')
TORCH_INDEX_URL ?=
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "setuptools>=69" wheel
	$(PIP) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_PIN)"
	# --no-build-isolation: deepspeed is an sdist whose build needs torch; an isolated build
	# environment would download the newest CUDA torch instead of using the pinned one.
	$(PIP) --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.pipeline --recipe tiny_cpu_demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check platform jobs pipelines serve tests

clean:
	rm -rf $(VENV) outputs runs
