# Two commands a new user needs: `make demo` and `make test`. Both create the virtual
# environment when it is missing (or when pyproject.toml changed) and install meshd into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak fuzz clean docs test-deploy

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m meshd.cmd.demo

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
	$(BIN)/python bench/api_write.py
	$(BIN)/python bench/groupcommit.py
	$(BIN)/python bench/vs_syncthing.py
	$(BIN)/python bench/circle_attacks.py --race-trials 5
	$(BIN)/python bench/backup_sparse.py

# The README's quickstart on two systemd machines booted with systemd-nspawn (root; about a
# minute). Skips, saying why, where that cannot work.
test-deploy: $(STAMP)
	MESHD_DEPLOY=1 $(BIN)/python -m pytest -q -m deploy tests/deploy

# Man pages meshd(8), meshctl(1) and bash/zsh/fish completions, generated from the parsers.
docs: $(STAMP)
	$(BIN)/python packaging/build-docs build/share

# Fuzzing (tests/fuzz/): 1,000,000 mutated inputs per sans-IO decoder, then 100,000 per live
# target (a real relay's port, a daemon's device port, the API socket). A finding is saved
# under tests/fuzz/regressions/, which `make test` replays. Smaller: make fuzz FUZZ_INPUTS=...
FUZZ_INPUTS ?= 1000000
FUZZ_LIVE_INPUTS ?= 100000
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.mutate --inputs $(FUZZ_INPUTS)
	MESHD_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q tests/fuzz/test_decoders.py -k arbitrary
	$(BIN)/python -m tests.fuzz.live --inputs $(FUZZ_LIVE_INPUTS)

# Soak: the fault and partition scenarios (issue 13), then the weeks-of-use scenario
# (issue 20; SOAK_MINUTES, default 30, sets its length), then the idle memory of a daemon
# holding 1,000,000 entries beside an empty one (about 15 minutes).
soak: $(STAMP)
	$(BIN)/python soak/faults.py
	$(BIN)/python soak/partition.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/idle_large.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build
