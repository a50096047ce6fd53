"""Shared data and cache: `dvc push` here, `dvc pull` in a fresh clone, and nothing reruns.

Uses the remote exactly as committed in .dvc/config (`~/...`), with HOME pointed at a temp folder.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import commit, locked_model_md5, make_project, run, stages_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def clone(source, target, env):
    run(["git", "clone", "-q", str(source), str(target)], target.parent, env)
    return {**env, "PYTHONPATH": str(target / "src")}


def test_a_fresh_clone_pulls_every_output_and_the_run_cache_so_nothing_reruns(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    root, env = make_project(tmp_path / "origin")
    env["HOME"] = str(home)
    # A team's history: each commit's outputs pushed with the run-cache.
    run(["dvc", "repro"], root, env)
    one_epoch = locked_model_md5(root)
    one_epoch_metrics = json.loads((root / "reports" / "metrics.json").read_text())
    commit(root, env, "one epoch")
    run(["dvc", "push", "--run-cache"], root, env)
    run(["dvc", "exp", "run", "-S", "train.epochs=2"], root, env)
    commit(root, env, "two epochs")
    pushed = run(["dvc", "push", "--run-cache"], root, env)
    assert "pushed" in pushed.stdout
    assert (home / ".cache" / "mnist-lstm" / "dvc-remote" / "files").is_dir()

    fresh = tmp_path / "fresh"
    fresh_env = clone(root, fresh, env)
    run(["dvc", "pull", "--run-cache"], fresh, fresh_env)
    for out in ("data/processed/mnist.npz", "models/model.keras", "reports/per_class.csv"):
        assert (fresh / out).read_bytes() == (root / out).read_bytes()
    repro = run(["dvc", "repro"], fresh, fresh_env)
    assert stages_run(repro) == [] and "Data and pipelines are up to date" in repro.stdout

    # Back to one epoch: the run-cache that travelled restores train (`--pull` fetches that older
    # model from the remote): no training. evaluate reruns: its metrics.json is kept in git
    # (cache: false), and DVC never run-caches such a stage.
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    back = run(["dvc", "repro", "--pull"], fresh, fresh_env)
    assert stages_run(back) == ["evaluate"]
    assert "Stage 'train' is cached - skipping run" in back.stdout
    assert locked_model_md5(fresh) == one_epoch
    assert json.loads((fresh / "reports" / "metrics.json").read_text()) == one_epoch_metrics
