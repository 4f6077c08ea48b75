# Two commands set up and run everything: `make demo` and `make test` (`make ablation`: the ablations).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint demo ablation install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The inner loop: everything but the tests marked slow (each over ~5 s here); CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# ruff: pycodestyle, pyflakes, import order, bugbear (rules in pyproject.toml); CI runs it first.
lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) cli.py run --config configs/demo.yaml

# The paper's ablations with 3 pre-training seeds each and statistics (at most 45 min on 2 CPU cores).
ablation: $(STAMP)
	$(PY) cli.py run --config configs/ablation.yaml

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf demo-out ablation-out .pytest_cache
