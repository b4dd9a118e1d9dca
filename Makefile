# Two commands a new user needs: `make demo` and `make test`. Both create the virtual
# environment when it is missing (or when pyproject.toml changed) and install meshd into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m meshd.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check meshd tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/channel.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/daemon.py

# The issue-20 soak scenario; SOAK_MINUTES (default 30) sets its length.
soak: $(STAMP)
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
