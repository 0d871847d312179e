# One venv inside the repo, created and filled by the targets that need it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject.toml) so the library keeps ranges.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo lint bench coverage clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadgroup fxstore tests README.md

demo: $(VENV)/.installed
	$(PY) -m fxstore.demo

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) benchmarks/bench_text.py

coverage: $(VENV)/.installed
	$(PY) -m fxstore.coverage --write docs/coverage.md

lint: $(VENV)/.installed
	$(PY) -m ruff check fxstore tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
