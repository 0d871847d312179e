# One venv inside the repo, created and filled by the targets that need it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject.toml) so the library keeps ranges.
TORCH := torch==2.14.1 torchvision==0.29.1
# Extras install under this constraints file so no package replaces the pinned torch.
PIN := -c tools/constraints.txt

.PHONY: test test-fast demo lint docs graphviz bench bench-readme coverage clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(PIN) -e '.[test,dev,docs]'
	touch $@

# The rendering tests need graphviz's `dot` program, a system package (Debian: graphviz). Installed here
# when missing and running as root (CI); nothing is done when `dot` is there; otherwise say how.
DOT ?= dot
graphviz:
	@command -v $(DOT) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing graphviz (the dot program) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; \
	  else \
	    echo "graphviz's dot program is missing: the tests that render pictures cannot run." \
	         "Install it with: sudo apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS)"; \
	  fi; }

# The full suite (CI runs it): library doctests, tests/ (slow model zoos included), the examples of
# the README and of the documentation pages (docs/*.md, --doctest-glob in setup.cfg) and the benchmark
# micro cases run once as tests; the 25 slowest tests are listed.
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup --durations=25
test: $(VENV)/.installed graphviz
	$(PYTEST) --benchmark-disable fxstore tools tests README.md docs benchmarks

# The edit loop: everything but the @pytest.mark.slow tests (model zoos, mutation runs).
test-fast: $(VENV)/.installed graphviz
	$(PYTEST) -m "not slow" fxstore tools tests README.md docs

# The documentation site (mkdocs.yml) into site/, warnings as errors; offline (no fonts or CDN fetched).
# Its pictures are made by docs/gen_pictures.py through the hook in tools/docs_build.py.
docs: $(VENV)/.installed graphviz
	$(PY) -m pip install -q $(PIN) -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

demo: $(VENV)/.installed
	$(PY) -m tools.demo

bench: $(VENV)/.installed
	$(PY) -m pip install -q $(PIN) -e '.[bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) benchmarks/bench_text.py

# Record a run in benchmarks/results/ and regenerate the tables from it (docs/benchmarks.md, README's headline).
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
	rm -rf $(VENV) build site *.egg-info
