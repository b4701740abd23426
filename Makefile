# Thin wrappers around scripts/; `make run ARGS='serve --port 8000'` passes arguments to the CLI.
.PHONY: setup run test lint

ARGS ?=

setup:
	scripts/setup.sh

run:
	scripts/run.sh $(ARGS)

test:
	scripts/test.sh $(ARGS)

lint:
	scripts/setup.sh --no-model
	.venv/bin/ruff check service model_store tests
