# Thin wrappers around scripts/; `make run` serves on :8000, `make run ARGS='serve --port 9000 --workers 2'` passes arguments to the CLI.
.PHONY: setup run test lint

ARGS ?=

setup:
	scripts/setup.sh

run:
	@scripts/run.sh $(ARGS)

test:
	@scripts/test.sh $(ARGS)

lint:
	scripts/setup.sh --no-model
	.venv/bin/ruff check service model_store bench tests
	.venv/bin/lint-imports
