"""The package's layering (pyproject's import-linter contract) and style checks, run with the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return path


def test_import_layers_contract_is_kept() -> None:
    proc = subprocess.run([tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract really bites: a copy of the package whose models/ imports engine/ fails it."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "dyhead_cli", copy / "dyhead_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    fpn = copy / "dyhead_cli" / "models" / "fpn.py"
    fpn.write_text(fpn.read_text() + "\nfrom dyhead_cli.engine import checkpoint  # noqa: E402,F401\n")
    proc = subprocess.run(
        [tool("lint-imports")], cwd=copy, capture_output=True, text=True, env={"PYTHONPATH": str(copy), "PATH": ""}
    )
    assert proc.returncode != 0
    assert "dyhead_cli.models is not allowed to import dyhead_cli.engine" in proc.stdout


def test_ruff_lint_and_format() -> None:
    ruff = tool("ruff")
    lint = subprocess.run([ruff, "check", "dyhead_cli", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run(
        [ruff, "format", "--check", "dyhead_cli", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout[-3000:]
