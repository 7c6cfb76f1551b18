"""Lint, format and the import contract run with the tests; the README and CI agree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install the [testing] extra")
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_lint():
    r = _run(_tool("ruff"), "check", "src", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = _run(_tool("ruff"), "format", "--check", "src", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_contract():
    """The core never imports napari, Qt or magicgui (import-linter, see pyproject.toml)."""
    r = _run(_tool("lint-imports"), "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: " in r.stdout and " broken" in r.stdout


def test_importing_the_package_is_light():
    code = (
        "import sys, napari_staindiffuser, napari_staindiffuser.config, "
        "napari_staindiffuser.events; "
        "heavy = [m for m in ('torch', 'napari', 'qtpy', 'magicgui') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    r = _run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing the package pulled in {r.stdout.strip()}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert block, "README.md must mark its test command with <!-- test-command -->"
    command = block.group(1).strip()
    assert command in ci, f"CI does not run the README's test command: {command}"
    demo = re.search(r"<!-- demo-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert demo and "staindiffuser demo" in demo.group(1)
