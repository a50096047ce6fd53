"""`make reproduce`: a registered model rebuilt from its name, byte for byte, in a temporary
worktree, with the real `dvc`, a real sqlite store and the real stages on tiny data; and each
way it says no, in one verdict naming what differs."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from conftest import commit, locked_model_md5, make_promotable_project, run
from test_champion import log_model_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHAMPION = "models:/mnist-lstm@champion"
REPRODUCED = "models:/mnist-lstm@champion (version 1): reproduced bit for bit"


def reproduce(root: Path, env: dict[str, str], *ref: str) -> subprocess.CompletedProcess:
    result = run([sys.executable, "-m", "mnist_lstm.reproduce", *ref], root, env, check=False)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def verdict(result: subprocess.CompletedProcess) -> list[str]:
    """The verdict: its line and the differences under it (progress lines left out)."""
    return [line for line in result.stdout.splitlines() if not line.startswith("reproduce: ")]


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the workspace but its caches and stores, by content; and git's view."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.startswith((".dvc/cache", ".git/", ".dvc/tmp")):
            if relative != "mlflow.db" and "__pycache__" not in relative:
                found[relative] = hashlib.md5(path.read_bytes()).hexdigest()
    found["<git status>"] = _git(root, "status", "--porcelain")
    found["<worktrees>"] = _git(root, "worktree", "list", "--porcelain")
    return found


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout


def leftover_worktrees() -> list[str]:
    return [p.name for p in Path(tempfile.gettempdir()).glob("mnist-lstm-reproduce-*")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A promoted champion, then a branch that moved on: other params and code, committed, and
    uncommitted edits on top."""
    root, env = make_promotable_project(tmp_path_factory.mktemp("reproduce") / "repo")
    run(["dvc", "repro"], root, env)
    run([sys.executable, "-m", "mnist_lstm.promote"], root, env)
    champion_md5 = locked_model_md5(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["units"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    model_py = root / "src" / "mnist_lstm" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# moved on after the champion\n")
    commit(root, env, "the branch moves on")
    run(["dvc", "repro"], root, env)
    commit(root, env, "its results")
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "# an edit\n")
    (root / "notes.txt").write_text("uncommitted work\n")
    return root, env, champion_md5


def test_the_champion_is_restored_from_the_cache_without_touching_the_workspace(project):
    root, env, champion_md5 = project
    before, before_leftovers = snapshot(root), leftover_worktrees()
    result = reproduce(root, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert verdict(result) == [f"{REPRODUCED} (restored from the cache)"]
    assert f"md5 {champion_md5}" in result.stdout
    assert snapshot(root) == before
    assert leftover_worktrees() == before_leftovers


def test_with_the_cache_emptied_the_champion_is_retrained_bit_for_bit(project):
    root, env, _ = project
    shutil.rmtree(root / ".dvc" / "cache")
    before = snapshot(root)
    result = reproduce(root, env, CHAMPION)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = verdict(result)
    assert line.startswith(f"{REPRODUCED} (retrained in ") and line.endswith(" s)"), line
    assert snapshot(root) == before
    # What it trained went to the cache: the next time it is restored from there.
    again = reproduce(root, env)
    assert verdict(again) == [f"{REPRODUCED} (restored from the cache)"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopped_mid_training_it_leaves_no_worktree_and_no_process(project, signum):
    root, env, _ = project
    shutil.rmtree(root / ".dvc" / "cache")
    before, before_leftovers = snapshot(root), leftover_worktrees()
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_lstm.reproduce"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    training = []
    while not training and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        training = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "mnist_lstm.train" in " ".join(_cmdline(p))
        ]
    assert training, "the rebuild never started training"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "Traceback" not in stdout + stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        f"error: interrupted ({signal.Signals(signum).name}); no output was written"
    ]
    assert not [p for p in training if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert snapshot(root) == before
    assert leftover_worktrees() == before_leftovers


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _champion_run(root: Path):
    client = _client(root)
    version = client.get_model_version_by_alias("mnist-lstm", "champion")
    return client.get_run(version.run_id)


def _forged_run(root: Path, params: dict[str, str], tags: dict[str, str]) -> tuple[str, str]:
    """A run with the champion's record, edited, holding a model of its own bytes (logged the
    project's way): what reproducing it must not mistake for the champion."""
    champion = _champion_run(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        recorded = {k: v for k, v in champion.data.tags.items() if not k.startswith("mlflow.")}
        run_id, _, md5 = log_model_run(Path(tempfile.mkdtemp()), seed=3, tags={**recorded, **tags})
        mlflow.MlflowClient().log_batch(
            run_id,
            params=[
                mlflow.entities.Param(key, value)
                for key, value in {**champion.data.params, **params}.items()
            ],
        )
    return run_id, md5


def test_a_run_whose_commit_is_not_in_the_repo_is_not_reproduced(project):
    root, env, _ = project
    run_id, _ = _forged_run(root, {}, {"git.commit": "0123456789abcdef" * 2 + "01234567"})
    result = reproduce(root, env, run_id)
    assert result.returncode == 1
    assert verdict(result) == [
        f"run {run_id}: not reproduced (commit 0123456789ab is not in this repository); "
        "recorded inputs that differ now:",
        "  - commit 0123456789ab: not in this repository (`git fetch` it; an experiment's: "
        "`dvc exp pull <remote> <name>`)",
    ]


def test_other_params_an_unknown_data_hash_and_another_tensorflow_are_each_named(project):
    root, env, _ = project
    champion = _champion_run(root)
    tensorflow = champion.data.tags["env.tensorflow"]
    run_id, md5 = _forged_run(
        root,
        {"train.seed": "1"},
        {"dvc.processed_md5": "0" * 32, "env.tensorflow": "1.15.0"},
    )
    before = snapshot(root)
    result = reproduce(root, env, run_id)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = verdict(result)
    assert lines[0].startswith(f"run {run_id}: not reproduced (the rebuilt model's md5 ")
    assert lines[0].endswith(
        f"differs from the registered bytes' {md5}); recorded inputs that differ now:"
    )
    processed = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["normalize"]["outs"][0]
    assert sorted(lines[1:]) == sorted(
        [
            "  - params (the run's, over params.yaml at its commit): train.seed: 0 -> 1",
            f"  - data: data/processed/mnist.npz md5 {'0' * 32} when it trained is in no cache "
            f"or remote here; rebuilt, it is {processed['md5']}",
            f"  - tensorflow: 1.15.0 when it trained, {tensorflow} here",
        ]
    )
    assert snapshot(root) == before


def test_the_run_records_what_reproduction_needs(project):
    root, _, _ = project
    champion = _champion_run(root)
    tags = champion.data.tags
    import numpy as np
    import tensorflow as tf

    assert tags["env.tensorflow"] == tf.__version__ and tags["env.numpy"] == np.__version__
    assert tags["env.platform"].endswith(("x86_64", "aarch64", "arm64", "AMD64"))
    assert tags["train.lstm_kernel_used"] in ("onednn", "keras")
    recorded = mlflow.artifacts.load_dict(f"{champion.info.artifact_uri}/reproduction.json")
    # What dvc.lock records for each train dependency: the data's md5 (tagged too) and the
    # code's at the run's commit.
    stages = yaml.safe_load(_git(root, "show", f"{tags['git.commit']}:dvc.yaml"))
    expected = {}
    for dep in stages["stages"]["train"]["deps"]:
        if dep == "data/processed/mnist.npz":
            expected[dep] = tags["dvc.processed_md5"]
        else:
            shown = subprocess.run(
                ["git", "show", f"{tags['git.commit']}:{dep}"], cwd=root, capture_output=True
            )
            expected[dep] = hashlib.md5(shown.stdout).hexdigest()
    assert recorded["train_dependencies"] == expected
    assert "src/mnist_lstm/model.py" in expected
