"""Queued sweeps: `dvc exp run --queue` + `dvc queue start -j 2`, all into the repo's store."""

from __future__ import annotations

import time

import pytest

from conftest import commit, make_project, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_four_queued_experiments_on_two_workers_all_land_in_the_repos_store(tmp_path):
    import mlflow

    root, env = make_project(tmp_path / "sweep")
    run(["dvc", "repro"], root, env)
    commit(root, env, "baseline")
    # As `make sweep` does it: forced, and the grid includes the baseline's own configuration
    # (units 16, lr 0.01), which DVC's run-cache would otherwise restore without logging a run.
    run(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-f",
            "-S",
            "train.units=16,12",
            "-S",
            "train.learning_rate=0.01,0.02",
        ],
        root,
        env,
    )
    run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], root, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, f"queue did not drain:\n{status}"
        time.sleep(3)
    assert status.count("Success") == 4, status
    assert "Failed" not in status

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lstm")
    runs = client.search_runs([experiment.experiment_id])
    swept = [r for r in runs if r.data.tags.get("dvc.dvc_exp_name")]
    assert len(swept) == 4, [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in swept)
    assert {
        (r.data.params["train.units"], r.data.params["train.learning_rate"]) for r in swept
    } == {("16", "0.01"), ("16", "0.02"), ("12", "0.01"), ("12", "0.02")}
    assert all("eval/val_accuracy" in r.data.metrics for r in swept)  # evaluate found each run
    names = {r.data.tags["dvc.dvc_exp_name"] for r in swept}
    shown = run(["dvc", "exp", "show", "--json"], root, env).stdout
    assert all(name in shown for name in names)
    # Nothing was written into the temporary copies DVC ran them in.
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
    for name in names:
        # The experiment's own output (both stages, and evaluate's line naming the run it logged
        # to): an empty or failed `dvc queue logs` must not pass the check below.
        logs = run(["dvc", "queue", "logs", name], root, env).stdout
        for expected in ("Running stage 'train'", "Running stage 'evaluate'", "evaluate: logged"):
            assert expected in logs, f"{name}: {expected!r} not in its queue logs:\n{logs}"
        assert "database is locked" not in logs, logs
