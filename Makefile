PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-test demo test lint

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m hest_zarr demo demo_output/mob1.zarr

test: install-test
	$(PYTHON) -m pytest -q

lint: install-test
	$(PYTHON) -m ruff check hest_zarr tests benchmarks
	$(PYTHON) -m ruff format --check hest_zarr tests benchmarks
