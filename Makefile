# The two commands: `make demo` and `make test`. Both create or reuse .venv first.
# `make demo ARGS="--pipeline ffcv"` passes options to demo.py.
PY := .venv/bin/python

.PHONY: setup demo test clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) demo.py $(ARGS)

# Two pytest processes, each taking whole files (module fixtures built once): on the 2-core machine much of
# the suite waits on process start-up and DDP rendezvous, which the other process fills.
# `make test TEST_JOBS=0` runs in one process.
TEST_JOBS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

clean:
	rm -rf runs data/demo .pytest_cache
