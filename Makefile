# The two commands of README.md. Both create or reuse .venv/ (tools/setup_env.py is idempotent).
PYTHON ?= python3
VENV_PY := .venv/bin/python

.PHONY: quickstart test

# Train the quickstart SOLOv2 on the synthetic shapes dataset (CPU), evaluate it, run the demo.
quickstart:
	$(PYTHON) tools/setup_env.py
	$(VENV_PY) tools/quickstart.py

# The whole test suite (offline, CPU). Extra pytest arguments: make test PYTEST_ARGS="-m 'not e2e'"
test:
	$(PYTHON) tools/setup_env.py --test
	$(VENV_PY) -m pytest $(PYTEST_ARGS)
