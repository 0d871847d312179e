# One venv inside the repo, created and filled by the targets that need it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject.toml) so the library keeps ranges.
TORCH := torch==2.14.1 torchvision==0.29.1
# Extras install under this constraints file so no package replaces the pinned torch.
PIN := -c tools/constraints.txt

.PHONY: test test-fast demo lint bench bench-readme coverage clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(PIN) -e '.[test,dev]'
	touch $@

# The full suite (CI runs it): library doctests, tests/ (slow model zoos included), the README's
# examples and the benchmark micro cases run once as tests; the 25 slowest tests are listed.
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup --durations=25
test: $(VENV)/.installed
	$(PYTEST) --benchmark-disable fxstore tools tests README.md benchmarks

# The edit loop: everything but the @pytest.mark.slow tests (model zoos, mutation runs).
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" fxstore tools tests README.md

demo: $(VENV)/.installed
	$(PY) -m tools.demo

bench: $(VENV)/.installed
	$(PY) -m pip install -q $(PIN) -e '.[bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) benchmarks/bench_text.py

# Record a run in benchmarks/results/ and regenerate the README's table from it.
bench-readme: $(VENV)/.installed
	$(PY) -m pip install -q $(PIN) -e '.[bench]'
	$(PY) -m benchmarks --threads 1 --save 2>&1 | tee .bench-readme.log
	$(PY) -m benchmarks.readme_table $$(sed -n 's/^saved //p' .bench-readme.log | tail -1)
	rm -f .bench-readme.log

coverage: $(VENV)/.installed
	$(PY) -m tools.coverage --write docs/coverage.md

lint: $(VENV)/.installed
	$(PY) -m ruff check fxstore tests benchmarks tools

clean:
	rm -rf $(VENV) build *.egg-info
