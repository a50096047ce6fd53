"""One lock for every platform and Python the project claims, agreeing with pyproject.toml, which
declares every third-party package the code imports. Resolution asks the package registry."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

# Not in the fast tier (`make test`); `make test-all` runs them (docs/testing.md).
pytestmark = pytest.mark.slow

UV = next(
    (
        str(p)
        for p in (REPO / ".tools" / "bin" / "uv", shutil.which("uv"))
        if p and Path(p).exists()
    ),
    None,
)
needs_uv = pytest.mark.skipif(
    UV is None, reason="uv is not installed (make install puts it in .tools)"
)
CHECK_LOCK = REPO / "tools" / "check_lock.py"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distributions pyproject.toml names, core and extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [
        spec for extra in project["optional-dependencies"].values() for spec in extra
    ]
    return {normalize(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in specs}


def imported_top_level(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_pyproject_declares_every_third_party_package_the_code_imports():
    # Used by name rather than imported: SQLAlchemy loads psycopg2 for server.py's
    # postgresql+psycopg2:// store URI; dvc and pytest run as commands.
    indirect = {"psycopg2-binary", "dvc", "pytest"}
    distributions = importlib.metadata.packages_distributions()
    missing = indirect - declared()
    # The project's own modules: the package, and the tests' helpers (conftest, netlab, ...).
    own = {"mnist_lstm"} | {path.stem for path in (REPO / "tests").glob("*.py")}
    for folder in ("src", "tests"):
        for module in imported_top_level(REPO / folder):
            if module in sys.stdlib_module_names or module in own:
                continue
            assert module in distributions, f"{folder} imports {module}, which nothing installs"
            # Some modules come from several distributions (mlflow, mlflow-skinny): one will do.
            if not {normalize(d) for d in distributions[module]} & declared():
                missing.add(f"{module} (from {', '.join(distributions[module])})")
    assert not missing, f"used but not declared in pyproject.toml: {sorted(missing)}"


@needs_uv
def test_the_lock_agrees_with_pyproject():
    result = subprocess.run([UV, "lock", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_uv
def test_the_lock_check_fails_for_a_platform_without_wheels(tmp_path):
    """The 12-target check (make lock-check, in CI) can fail: tensorflow-cpu, which the project
    used to pin, has no macOS wheel."""
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "old"\nversion = "0"\nrequires-python = ">=3.11,<3.14"\n'
        'dependencies = ["tensorflow-cpu==2.21.0"]\n'
    )
    subprocess.run([UV, "lock"], cwd=tmp_path, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, str(CHECK_LOCK), "--uv", UV, "--lock", str(tmp_path / "uv.lock"),
         "--target", "x86_64-manylinux_2_28", "3.11", "--target", "aarch64-apple-darwin", "3.12"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("x86_64-manylinux_2_28 Python 3.11: ok")
    assert lines[1].startswith("aarch64-apple-darwin Python 3.12: FAIL")
    assert "tensorflow-cpu" in lines[1]
    assert lines[-1] == f"1/2 targets resolve to {tmp_path / 'uv.lock'}"
