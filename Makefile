# The two commands of the README: `make bench` (the main job) and `make test`.
#
# Where python3 has no torch (a CPU machine), both create .venv on first use and install,
# with the versions pinned by constraints.txt (the lock: what CI has tested), torch 2.13.0
# and lenalign in editable mode; nothing resolves to a newer release. Which build of torch
# 2.13.0 comes is the index's choice: this workplace's machines find the CPU build on
# their own disk; on a stock Linux machine, PyPI's is a CUDA build of several GB (set
# PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index for the make call to get the CPU one).
#
# Where python3 already has torch (a GPU box, whose python3 is itself a venv with no
# network), nothing is installed and no .venv is made: the tests and the bench run on that
# interpreter and its packages, with the checkout on PYTHONPATH (lenalign/kernels is a
# link to kernels/, so the checkout imports as installed).
#
# `make test-latest` runs the suite against the newest releases instead (a fresh
# .venv-latest, no lock; torch stays the CPU build), and `make lock` rewrites
# constraints.txt from the releases test-latest ran: test-latest, then lock, then test.
PYTHON ?= python3
VENV := .venv
LATEST := .venv-latest
LOCK := constraints.txt
CPU_TORCH := torch==2.13.0
EXTRAS := .[dev,train,bench,trl,deepspeed]
HAS_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)

ifeq ($(HAS_TORCH),yes)
STAMP :=
PY := PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON)
else
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
endif

.PHONY: venv test bench lint test-latest lock clean

venv: $(STAMP)

ifneq ($(HAS_TORCH),yes)
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools wheel
	$(PY) -m pip install -q -c $(LOCK) "$(CPU_TORCH)"
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e "$(EXTRAS)"
	@touch $(STAMP)
endif

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m lenalign.cli bench

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The newest releases of everything but torch (held at the CPU build by a constraint: an
# eager upgrade would take a CUDA build). test-latest resolves them afresh every time;
# lock freezes the .venv-latest that test-latest last tested (building one if none is
# there), so that what is locked is what ran.
$(LATEST)/.installed:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools wheel
	@echo "$(CPU_TORCH)" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch.txt --upgrade \
		--upgrade-strategy eager --no-build-isolation -e "$(EXTRAS)"
	@touch $@

test-latest:
	rm -f $(LATEST)/.installed
	$(MAKE) $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q tests

# pip freeze of the newest releases, torch's local version label dropped (torch==2.13.0
# matches the CPU build here and whatever build a platform's index serves)
lock: $(LATEST)/.installed
	@{ \
		echo "# The lock: the versions make test and make bench install (pip -c), the"; \
		echo "# newest releases on $$(date -u +%Y-%m-%d) as resolved on Linux x86-64,"; \
		echo "# $$($(LATEST)/bin/python -c 'import sys; print("CPython", sys.version.split()[0])') (on another Python, run make lock there first)."; \
		echo "# Regenerate with make test-latest, then make lock (README.md, 'Set-up and the lock')."; \
		$(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; \
	} > $(LOCK)
	@echo "wrote $(LOCK)"

clean:
	rm -rf $(VENV) $(LATEST) build dist *.egg-info
