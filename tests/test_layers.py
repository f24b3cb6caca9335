"""The package's layering, beyond what import-linter's contracts check (see ``[tool.importlinter]``).

import-linter checks which modules import which; it cannot see imported *names*. These tests read every
module's imports and refuse private names crossing a module boundary, and operators that take URLs.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hest_zarr"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _private_imports(path: Path) -> list[str]:
    """``module: from X import _name`` for private names, and private modules of another top-level package."""
    module = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("hest_zarr"):
            continue
        source = node.module or ""
        private_module = any(part.startswith("_") for part in source.split(".")[1:])
        if private_module and _top_package(source) != _top_package(module):
            found.append(f"{module}: from {source} import ...")
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{module}: from {source} import {alias.name}")
    return found


def test_no_private_name_or_module_crosses_a_boundary() -> None:
    offenders = [line for path in _modules() for line in _private_imports(path)]
    assert offenders == []


def test_the_scan_sees_a_private_import() -> None:
    """The scan above must be able to fail: a planted module importing a private name is reported."""
    planted = PACKAGE / "ops" / "_planted_for_the_layer_test.py"
    planted.write_text("from hest_zarr.store._raster import _levels\nfrom hest_zarr.converters.visium import _x\n")
    try:
        assert _private_imports(planted) == [
            "hest_zarr.ops._planted_for_the_layer_test: from hest_zarr.store._raster import ...",
            "hest_zarr.ops._planted_for_the_layer_test: from hest_zarr.store._raster import _levels",
            "hest_zarr.ops._planted_for_the_layer_test: from hest_zarr.converters.visium import _x",
        ]
    finally:
        planted.unlink()


URL_PARAMETERS = {"url", "urls", "path", "store", "storage_options", "out"}


@pytest.mark.parametrize(
    "module",
    sorted(
        _module_name(path)
        for path in _modules()
        if _top_package(_module_name(path)) == "ops" and not path.name.startswith("_")
    ),
)
def test_operators_take_no_url(module: str) -> None:
    """Public functions of ``hest_zarr.ops`` take elements and arrays, never a store URL or storage options."""
    import importlib

    loaded = importlib.import_module(module)
    offenders = []
    for name, function in inspect.getmembers(loaded, inspect.isfunction):
        if name.startswith("_") or function.__module__ != module:
            continue
        parameters = set(inspect.signature(function).parameters)
        if parameters & URL_PARAMETERS:
            offenders.append(f"{name}{inspect.signature(function)}")
    assert offenders == []
