# The two commands: `make demo` and `make test`. Both create .venv on first use
# and refresh it whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/autopose demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	@for script in benchmarks/*.py; do \
		if [ "$$script" = benchmarks/gpu.py ]; then continue; fi; \
		echo "# $$script" >&2; $(PY) $$script || exit 1; done

# The GPU check (a CUDA machine; about 8 minutes): JSON lines, see benchmarks/gpu.py.
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check autopose tests benchmarks jobs
	$(VENV)/bin/ruff format --check autopose tests benchmarks jobs
