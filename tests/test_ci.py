"""CI's own machinery (.ci/run, the GitHub workflow): every skip listed with its reason, and a
skip that fails the run where CI installed every part a test needs (tests/conftest.py's hooks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import NO_SKIPS_ENV, REPO, SKIP_REPORT_ENV

TESTS = """
import pytest

def test_runs():
    pass

def test_needs_a_widget():
    pytest.skip("no widget here (apt-get install widget)")
"""


def pytest_in(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """A pytest session over `folder` with the project's conftest (its hooks under test)."""
    shutil.copy2(REPO / "tests" / "conftest.py", folder / "conftest.py")
    clean = {k: v for k, v in os.environ.items() if k not in (SKIP_REPORT_ENV, NO_SKIPS_ENV)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
         str(folder), *args],
        env={**clean, **env}, cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_skip_is_listed_with_its_reason_and_a_run_without_skips_says_none(tmp_path):
    (tmp_path / "test_sample.py").write_text(TESTS)
    report = tmp_path / "reports" / "ci-skips.md"
    env = {SKIP_REPORT_ENV: str(report), "MNIST_LSTM_SKIP_LABEL": "make test"}
    first = pytest_in(tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = pytest_in(tmp_path, {**env, "MNIST_LSTM_SKIP_LABEL": "make test-all"}, "-k", "runs")
    assert second.returncode == 0, second.stdout + second.stderr
    assert report.read_text().splitlines() == [
        "| run | skipped test | why |",
        "|---|---|---|",
        "| make test | `test_sample.py::test_needs_a_widget` | no widget here (apt-get install "
        "widget) |",
        "| make test-all | none | |",
    ]


def test_where_ci_forbids_skips_a_skip_fails_the_run_in_one_line(tmp_path):
    (tmp_path / "test_sample.py").write_text(TESTS)
    allowed = pytest_in(tmp_path, {})
    assert allowed.returncode == 0 and "1 skipped" in allowed.stdout
    forbidden = pytest_in(tmp_path, {NO_SKIPS_ENV: "1"})
    assert forbidden.returncode == 1, forbidden.stdout
    assert (
        f"error: 1 test(s) skipped where {NO_SKIPS_ENV}=1 (CI installed every part they need)"
        in forbidden.stdout
    )
    # Nothing skipped: the rule changes nothing.
    clean = pytest_in(tmp_path, {NO_SKIPS_ENV: "1"}, "-k", "runs")
    assert clean.returncode == 0, clean.stdout
