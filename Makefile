# mario-a3c: `make train` runs the main job, `make test` runs every check. Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
LEGACY_VENV ?= .venv-legacy
PY_MODERN   ?= $(shell .ci/find-python 3.13 2>/dev/null || .ci/find-python 3.14 2>/dev/null)
PY_LEGACY   ?= $(shell .ci/find-python 3.11 2>/dev/null)
PIP_FLAGS   ?= -q --disable-pip-version-check
ARGS        ?=

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# A venv is (re)built when its requirements change; the stamp records what it was built from.
$(VENV)/.stamp: setup.py constraints.txt settings.ini
	@test -n "$(PY_MODERN)" || { .ci/find-python 3.13; exit 1; }
	@echo "== modern stack venv ($(VENV), $$($(PY_MODERN) -V))"
	@test -x $(VENV)/bin/python || $(PY_MODERN) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -U pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[dev]'
	@touch $@

$(LEGACY_VENV)/.stamp: setup.py constraints.txt settings.ini
	@test -n "$(PY_LEGACY)" || { .ci/find-python 3.11; exit 1; }
	@echo "== legacy stack venv ($(LEGACY_VENV), $$($(PY_LEGACY) -V))"
	@test -x $(LEGACY_VENV)/bin/python || $(PY_LEGACY) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install $(PIP_FLAGS) -U pip
	$(LEGACY_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test]'
	@touch $@

venv: $(VENV)/.stamp  ## create/refresh the modern-stack venv (Python >= 3.13)
venv-legacy: $(LEGACY_VENV)/.stamp  ## create/refresh the legacy-stack venv (Python 3.11)

train: venv  ## the main job: train Mario on World 1-1 with the package's World 1-1 recipe (ARGS="--help" for flags)
	$(VENV)/bin/mario-a3c train --config mario_a3c/configs/world1_stage1.json $(ARGS)

sync-check: venv  ## notebooks and package agree, notebooks are clean, README matches nbs/index.ipynb
	$(VENV)/bin/python .ci/sync_check.py
	$(VENV)/bin/python .ci/readme.py --check

readme: venv  ## regenerate README.md from nbs/index.ipynb
	$(VENV)/bin/python .ci/readme.py

lab: venv  ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab --notebook-dir=nbs $(if $(filter 0,$(shell id -u)),--allow-root)

nbtest: venv  ## execute every notebook (fast cells; add FLAGS=slow for all)
	cd nbs && ../$(VENV)/bin/nbdev_test --n_workers 2 --timing $(if $(FLAGS),--flags "$(FLAGS)")

# `make test` adds the `gpu` flag to the notebook tests where the venv's torch sees CUDA (the pytest CUDA tests run there
# by themselves): the AMP and CUDA-checkpoint cells are checked on every machine that has a GPU.
CUDA_CHECK  = import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)

test: venv venv-legacy  ## everything: sync check, notebooks (+ gpu cells with CUDA), env tests on both stacks, full pytest suite
	$(MAKE) --no-print-directory sync-check
	@flags="$(strip $(FLAGS))"; \
	if $(VENV)/bin/python -c '$(CUDA_CHECK)'; then flags="$${flags:+$$flags }gpu"; echo "== CUDA found: notebook cells flagged gpu run too"; fi; \
	$(MAKE) --no-print-directory nbtest FLAGS="$$flags"
	@echo "== pytest, legacy stack (environment tests)"
	$(LEGACY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_envs.py
	@echo "== pytest, modern stack (full suite)"
	MARIO_A3C_OTHER_PYTHON=$(CURDIR)/$(LEGACY_VENV)/bin/python $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

curves: venv  ## redraw the learning curves in docs/ from the shipped metrics (docs/runs/*/metrics.jsonl.gz)
	$(VENV)/bin/mario-a3c curves $(ARGS)

bench-env: venv  ## environment throughput benchmark (JSON last line)
	$(VENV)/bin/mario-a3c bench-env --json $(ARGS)

clean:  ## remove venvs and build products (not output/ or checkpoints)
	rm -rf $(VENV) $(LEGACY_VENV) build dist *.egg-info _proc _docs

.PHONY: help venv venv-legacy train sync-check readme lab nbtest test curves bench-env clean
