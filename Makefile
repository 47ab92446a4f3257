# The two commands of the README: `make bench` (the main job) and `make test`.
# Both create .venv on first use. A CPU machine gets the local CPU build of torch
# (torch==2.13.0); a machine whose python3 already has torch (a GPU box) reuses it
# through --system-site-packages, so set-up never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CPU_TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "reusing the torch of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade pip; \
		$(PY) -m pip install -q "$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[dev,train,bench,trl]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/lenalign bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info
