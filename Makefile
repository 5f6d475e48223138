# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# Byte-code: where PYTHONDONTWRITEBYTECODE is set (it is on these machines) nothing is compiled later, and every
# process would compile torch again at import. So the install compiles exactly what fedsync's processes import (one
# warm-up import, about a third of what compiling every installed file costs), and `make test` lets its first
# processes cache whatever else they import, once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsync-installed

.PHONY: demo test bench mutants clean-venv

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-compile -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-compile --no-deps -e .
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -c "import fedsync.cli.main, fedsync.coordinator, fedsync.worker, \
	  fedsync.cli.demo, fedsync.cli.status, fedsync.cli.verify, torchvision.models, torchvision.datasets, \
	  torch._dynamo, pytest"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsync demo

test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q

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
