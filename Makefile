# The two commands: `make demo` and `make test`. Both create or reuse .venv first.
# `make demo ARGS="--pipeline ffcv"` passes options to demo.py.
PY := .venv/bin/python

.PHONY: setup demo test clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) demo.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data/demo .pytest_cache
