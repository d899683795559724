"""docs/robustness.md stays current: every test it names exists, every robustness test is named."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "robustness.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
    }


def _rows() -> list[str]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    return [ln for ln in lines if ln.startswith("|") and not set(ln) <= set("|- ")
            and not ln.startswith("| Case ")]  # fmt: skip


def test_every_row_names_existing_tests():
    rows = _rows()
    assert len(rows) >= 20
    for row in rows:
        ids = TEST_ID.findall(row)
        assert ids, f"row names no test: {row[:60]}"
        for file, name in ids:
            path = ROOT / file
            assert path.is_file(), f"{file} does not exist"
            assert name in _test_functions(path), f"{file}::{name} does not exist"


def test_every_robustness_test_is_in_the_table():
    named = {(f, n) for row in _rows() for f, n in TEST_ID.findall(row)}
    for path in sorted(ROOT.glob("tests/test_robustness*.py")):
        if path.name == Path(__file__).name:
            continue
        for name in _test_functions(path):
            assert (f"tests/{path.name}", name) in named, f"{path.name}::{name} missing from {DOC}"


def test_xfail_rows_match_xfail_tests():
    """A row says xfail exactly when its robustness test is marked xfail (gaps stay visible)."""
    files = sorted((ROOT / "tests").glob("test_robustness*.py"))
    files = [f for f in files if f.name != Path(__file__).name]
    xfails = {
        (f"tests/{f.name}", n)
        for f in files
        for n in re.findall(r"@pytest\.mark\.xfail\([^)]*\)\s*\ndef (\w+)", f.read_text("utf-8"))
    }
    names = {f"tests/{f.name}" for f in files}
    for row in _rows():
        ours = {(f, n) for f, n in TEST_ID.findall(row) if f in names}
        if "**xfail**" in row:
            assert ours and ours <= xfails, row[:60]
        else:
            assert not ours & xfails, row[:60]
