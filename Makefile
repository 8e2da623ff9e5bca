# The two front-door commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STORE ?= ./runs
PYTEST_ARGS ?=

.PHONY: venv demo sweep test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dtrak-ray run jobs/configs/demo.yaml --store $(STORE) --yes

sweep: $(STAMP)
	$(BIN)/dtrak-ray sweep jobs/configs/demo.yaml --store $(STORE)

# Each benchmark prints its ratios on its last lines; run them on an otherwise idle machine.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_featurize
	$(BIN)/python -m benchmarks.bench_vs_trak
	$(BIN)/python -m benchmarks.bench_scaling
	$(BIN)/python -m benchmarks.bench_lambda_sweep
	$(BIN)/python -m benchmarks.bench_reduction_memory

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dtrak_ray tests benchmarks jobs

clean:
	rm -rf $(VENV) .pytest_cache
