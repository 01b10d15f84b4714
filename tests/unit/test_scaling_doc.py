"""docs/scaling.md's tables are what benchmarks/scaling_table.py computes now (regenerate them with --write)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():  # noqa: ANN202  (a module)
    spec = importlib.util.spec_from_file_location("scaling_table", ROOT / "benchmarks" / "scaling_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_doc_tables_are_current() -> None:
    assert _script().main(["--check", str(ROOT / "docs" / "scaling.md")]) == 0


def test_fill_replaces_marked_tables_only() -> None:
    fill = _script().fill
    doc = "prose\n<!-- table: a -->\nold\n<!-- /table -->\nmore prose\n"
    assert fill(doc, {"a": "| x |"}) == "prose\n<!-- table: a -->\n| x |\n<!-- /table -->\nmore prose\n"
    with pytest.raises(SystemExit, match="unknown table 'b'"):
        fill("<!-- table: b -->\n<!-- /table -->", {"a": ""})
