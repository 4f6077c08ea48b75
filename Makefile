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

# One pytest worker per logical CPU (at most 4; each holds a few ResNet50s), one thread each
# (tests/conftest.py); worksteal lets an idle worker take tests queued on a busy one.
# PYTEST_XDIST_AUTO_NUM_WORKERS=1 make test runs them in one worker.
PYTEST := $(PY) -m pytest -q -n logical --maxprocesses=4 --dist worksteal

test: $(STAMP)
	$(PYTEST) --durations=10 tests

# The inner loop: everything but the tests marked slow (each over ~5 s here); CI runs `make test`.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

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
