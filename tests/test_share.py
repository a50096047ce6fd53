"""`make share` never lies: what it cannot publish whole, it refuses in one line, exit 1.

Real parts only: the dvc CLI and API, a git remote that is a bare repository on disk, a DVC remote
that is a local folder -- and, for the connection bound, an SSH DVC remote at an address whose
packets vanish (a network namespace from tests/netlab.py, so a blackhole cuts only that host).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab
from conftest import REPO, make_project, run

SHARE = [sys.executable, "-m", "mnist_lstm.share"]


def shared_project(root: Path) -> tuple[Path, dict[str, str], Path, Path]:
    """A tiny project whose git remote `origin` is a bare repository and whose DVC remote is a
    folder, both next to it. Returns the project, its environment, the git remote, the store."""
    work, env = make_project(root / "work")
    git_dir, store = root / "git.git", root / "store"
    run(["git", "init", "-q", "--bare", str(git_dir)], root, env)
    run(["git", "remote", "add", "origin", str(git_dir)], work, env)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], work, env)
    run(["dvc", "remote", "modify", "--local", "shared", "url", str(store)], work, env)
    return work, env, git_dir, store


def refused(result: subprocess.CompletedProcess) -> str:
    """The one line a refusal prints: exit 1, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: share: "), line
    return line


def remote_exps(git_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """The git remote's experiment refs: full ref -> commit."""
    listed = run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], git_dir, env
    )
    return dict(line.split() for line in listed.stdout.splitlines())


def stored(store: Path) -> set[Path]:
    return {path.relative_to(store) for path in store.rglob("*") if path.is_file()}


def local_ref(work: Path, env: dict[str, str], name: str) -> str:
    """The full ref of this clone's experiment `name` run from the current commit."""
    head = run(["git", "rev-parse", "HEAD"], work, env).stdout.strip()
    listed = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], work, env)
    (ref,) = [ref for ref in listed.stdout.split() if ref.endswith(f"{head[2:]}/{name}")]
    return ref


@pytest.mark.e2e
def test_outside_a_dvc_project_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    line = refused(run([*SHARE, "exp-a"], tmp_path, env, check=False))
    assert "not inside a DVC project" in line and "nothing was pushed" in line


@pytest.mark.e2e
def test_an_unknown_name_or_a_missing_remote_is_one_line(tmp_path):
    work, env, git_dir, store = shared_project(tmp_path)

    line = refused(run([*SHARE, "no-such-exp"], work, env, check=False))
    assert "no experiment named 'no-such-exp'" in line and "dvc exp list" in line, line
    line = refused(
        run([*SHARE, "--dvc-remote", "elsewhere", "no-such-exp"], work, env, check=False)
    )
    assert "no DVC remote named 'elsewhere'" in line, line
    line = refused(run([*SHARE, "--timeout", "soon"], work, env, check=False))
    assert "--timeout must be a whole number of seconds" in line, line

    run(["dvc", "remote", "remove", "shared"], work, env)
    line = refused(run([*SHARE, "no-such-exp"], work, env, check=False))
    assert "no default DVC remote" in line and "dvc remote add -d" in line, line
    assert remote_exps(git_dir, env) == {} and not store.exists()


@pytest.mark.slow
def test_a_name_taken_on_the_git_remote_is_refused_before_anything_is_pushed(tmp_path):
    work, env, git_dir, store = shared_project(tmp_path)
    run(["dvc", "exp", "run", "-n", "dup"], work, env)
    run([*SHARE, "dup"], work, env)
    first = remote_exps(git_dir, env)
    assert list(first) == [local_ref(work, env, "dup")]

    # Another experiment under the same name, from the same commit: git would refuse its ref.
    run(["dvc", "exp", "remove", "dup"], work, env)
    run(["dvc", "exp", "run", "-n", "dup", "-S", "train.learning_rate=0.02"], work, env)
    run(["dvc", "exp", "run", "-n", "other", "-S", "train.units=8"], work, env)
    files = stored(store)
    line = refused(run([*SHARE, "dup", "other"], work, env, check=False))
    assert "'origin' already has a different experiment named 'dup'" in line, line
    assert "dvc exp rename dup" in line and "dvc exp pull --force origin dup" in line, line
    assert "--force" in line and "nothing was pushed" in line, line
    # Nothing of either experiment went out: not the other's ref, not a byte of data.
    assert remote_exps(git_dir, env) == first
    assert stored(store) == files

    # --force, asked for: ours replaces theirs, and the other goes with it.
    forced = run([*SHARE, "--force", "dup", "other"], work, env)
    assert "replaced the remote's dup (--force)" in forced.stdout, forced.stdout
    ours = {ref: run(["git", "rev-parse", ref], work, env).stdout.strip()
            for ref in (local_ref(work, env, "dup"), local_ref(work, env, "other"))}  # fmt: skip
    assert remote_exps(git_dir, env) == ours
    assert stored(store) > files

    # The same name run from two other commits, shared from a third: which one is meant?
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "second baseline"], work, env)
    run(["dvc", "exp", "run", "-n", "dup", "-S", "train.units=12"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "third baseline"], work, env)
    line = refused(run([*SHARE, "dup"], work, env, check=False))
    assert "'dup' names experiments of several commits" in line, line
    assert line.count("refs/exps/") == 2 and "pass one full ref" in line, line
    assert remote_exps(git_dir, env) == ours


def blackhole(host: netlab.Host, address: str) -> None:
    """From now on `host`'s packets to `address` vanish without an answer: the address resolves
    to a hardware address no one on the link has, so nothing refuses and nothing replies (a
    route of type `unreachable` or `blackhole` would fail the connect at once instead)."""
    subprocess.run(
        ["ip", "-n", host.netns, "neigh", "add", address, "lladdr", "02:00:00:00:0b:1e",
         "dev", "eth0", "nud", "permanent"],
        check=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_dvc_remote_that_drops_packets_is_given_up_on_within_the_bound(tmp_path):
    problem = netlab.unavailable()
    if problem and not os.environ.get(netlab.REQUIRE_ENV):
        pytest.skip(problem)
    assert problem is None, problem
    work, env, git_dir, _ = shared_project(tmp_path)
    run(["dvc", "exp", "run", "-n", "exp-a"], work, env)

    with netlab.Lab.create() as lab:
        worker = lab.host("worker")
        silent = f"{lab.subnet}.200"
        blackhole(worker, silent)
        url = f"ssh://root@{silent}/srv/dvc-store"
        run(["dvc", "remote", "modify", "--local", "shared", "url", url], work, env)
        config = {path: path.read_text() for path in (work / ".dvc").glob("config*")}
        for args, bound in ((["--timeout", "3"], 3), ([], 30)):
            started = time.monotonic()
            result = worker.run([*SHARE, *args, "exp-a"], cwd=work, env=env, timeout=300)
            elapsed = time.monotonic() - started
            line = refused(result)
            assert f"DVC remote 'shared' ({url}) failed (no answer within {bound} s;" in line
            assert "MNIST_LSTM_SHARE_TIMEOUT" in line and "no experiment ref was pushed" in line
            # A bound, not a benchmark: the OS alone waits over two minutes.
            assert elapsed < bound + 30, elapsed
    assert remote_exps(git_dir, env) == {}
    # The bound was this run's own: the project's DVC config is as it was.
    assert {path: path.read_text() for path in (work / ".dvc").glob("config*")} == config
