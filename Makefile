# Entry points; each script installs what it needs first (scripts/setup, idempotent).
PYTHON := .venv/bin/python

.PHONY: test demo bench bench-quick

test:
	scripts/test

demo:
	scripts/demo

# Full bench (about 50 minutes, both CPUs busy): bench/results/<timestamp>.* and latest.*
bench:
	scripts/setup
	$(PYTHON) -m bench

# One short round of every pass (about 3 minutes): bench/results/quick/
bench-quick:
	scripts/setup
	$(PYTHON) -m bench --quick
