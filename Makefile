# The two commands of the quick start: `make demo` and `make test`. Both set up what is missing first.
.PHONY: setup demo test lint bench-ingest

setup:
	@bash scripts/bootstrap.sh

demo: setup
	.venv/bin/raddraft demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports

bench-ingest: setup
	.venv/bin/python -m bench.ingest
