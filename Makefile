# The two set-up commands in the README: `make demo` (main job) and `make test` (fast suite; `make test-all`
# adds the tests marked slow). CI runs `make test`.
# Both create a local virtual environment in .venv on first use (torch 2.13.0 CPU wheel + extras).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hero-installed

PYTEST_FLAGS ?= -q -x

.PHONY: demo test test-all install bench compile-report quickstart clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: any later torch requirement it satisfies installs nothing more.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,train,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hero demo --config configs/demo.yaml --out demo_out

# Deselects @pytest.mark.slow (the demo pipeline end to end, long compile / integration runs).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS) tests

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

bench: $(STAMP)
	$(PY) -m benchmarks

compile-report: $(STAMP)
	$(PY) -m benchmarks.compile_report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
