PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# import-linter's contracts (pyproject.toml), run with the same interpreter as the tests
LINT_IMPORTS = $(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

.PHONY: install install-test demo test lint

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m hest_zarr demo demo_output/mob1.zarr

test: install-test
	$(LINT_IMPORTS)
	$(PYTHON) -m pytest -q

lint: install-test
	$(LINT_IMPORTS)
	$(PYTHON) -m ruff check hest_zarr tests benchmarks
	$(PYTHON) -m ruff format --check hest_zarr tests benchmarks
