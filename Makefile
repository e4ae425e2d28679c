# The two commands of README.md. Both set up .venv first (idempotent).
.PHONY: setup test train test-fast clean-cache

setup:
	@bash scripts/setup.sh

# The whole test suite, as CI runs it.
test: setup
	@bash scripts/test_deps.sh
	.venv/bin/python -m pytest -q --durations=20

# Unit tests only (no engine, no processes): seconds.
test-fast: setup
	.venv/bin/python -m pytest -q tests/core tests/protocols tests/tasks

# The main job: a real ESPO training run on CPU with the embedded tiny model.
train: setup
	.venv/bin/python run.py --config configs/default.yaml
