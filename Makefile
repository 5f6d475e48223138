# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# pip byte-compiles at install on purpose: where PYTHONDONTWRITEBYTECODE is set (it is on these machines)
# nothing is compiled later, and every process would compile torch again at import.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsync-installed
LLM_STAMP := $(VENV)/.fedsync-llm-installed  # the causal_lm task's libraries: the tests install them, the demo not

.PHONY: demo test test-fast bench mutants clean-venv

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

$(LLM_STAMP): $(STAMP) requirements-llm.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-llm.txt
	touch $(LLM_STAMP)

demo: $(STAMP)
	$(BIN)/fedsync demo

# Two test files at a time, each file in one process (module fixtures stay shared): the suite's processes spend
# most of their time waiting on each other and on deadlines, so two at a time take about 6.5 minutes on the 2-core
# VM we measure on (docs/BENCHMARKS.md).
test: $(STAMP) $(LLM_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The fast lane while changing code: every test that starts no process (marked `processes` otherwise; a test that
# starts a fedsync process without the mark fails), about 20 s.
test-fast: $(STAMP) $(LLM_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not processes"

bench: $(STAMP)
	$(BIN)/python benchmarks/hash_speed.py
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/round_overhead.py
	$(BIN)/python benchmarks/demo_time.py
	$(BIN)/python benchmarks/restart.py
	$(BIN)/python benchmarks/poll_cost.py
	$(BIN)/python benchmarks/syncthing_rounds.py
	$(BIN)/python benchmarks/worker_throughput.py
	$(BIN)/python benchmarks/mixed_speed.py
	$(BIN)/python benchmarks/mutants.py

mutants: $(STAMP)
	$(BIN)/python benchmarks/mutants.py

clean-venv:
	rm -rf $(VENV)
