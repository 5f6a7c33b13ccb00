# The two set-up commands in the README: `make demo` (main job) and `make test` (fast suite; `make test-all`
# adds the tests marked slow). CI (.ci/run) runs `make test`, then `make test-verl`.
# Both create a local virtual environment in .venv on first use (torch 2.13.0 CPU wheel + extras).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hero-installed

PYTEST_FLAGS ?= -q -x

.PHONY: demo test test-all test-verl install bench roofline compile-report gpu-suite-dry wheels quickstart \
	clean

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

# verl 0.9.1 pins transformers<5.11, which the main venv's trl stack does not want: its integration tests get a
# side venv (.venv-verl, torch CPU wheel first, then verl and the project's test deps that verl allows).
VERL_VENV ?= .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.hero-installed

$(VERL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q torch==2.13.0
	$(VERL_PY) -m pip install -q 'verl==0.9.1' 'transformers<5.11' -e '.[test]'
	touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_PY) -m pytest -q -x tests/test_integrations.py -k verl

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

bench: $(STAMP)
	$(PY) -m benchmarks

compile-report: $(STAMP)
	$(PY) -m benchmarks.compile_report

# the roofline model of the GPU launch plans (no GPU needed)
roofline: $(STAMP)
	$(PY) -m benchmarks.roofline --json benchmarks/results/ci/roofline.json --md benchmarks/results/ci/roofline.md

# the anchors' wheels for a GPU machine without internet (.whl/ travels with the device tool's `carry`)
wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 verl==0.9.1

# the GPU suite's stages on CPU at tiny size (what a lent GPU machine would run, minus the device)
gpu-suite-dry: $(STAMP)
	HERO_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh

clean:
	rm -rf $(VENV) $(VERL_VENV) build *.egg-info .pytest_cache
