"""The GPU window: lab tooling that carries the project to a bare, lent GPU machine without a network, runs
the correctness checks (`pytest -m cuda`) and the benchmarks there in one script, and rehearses it all on a
CPU first (README.md in this folder). Not part of the product: nothing but the tests imports it."""
