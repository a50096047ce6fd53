"""Gate and registry end to end: the real `dvc` CLI, a real sqlite MLflow store and registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import commit, make_promotable_project, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = make_promotable_project(tmp_path_factory.mktemp("promote"))
    run(["dvc", "repro"], root, env)
    commit(root, env, "baseline run")  # dvc.lock and reports/metrics.json, as a user would
    return root, env


def py(root, env, module, *args, check=True):
    return run(["python", "-m", f"mnist_lstm.{module}", *args], root, env, check=check)


def registry(root):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow, mlflow.MlflowClient()


def test_a_good_first_run_passes_the_gate_and_becomes_champion(project):
    root, env = project
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["val_accuracy"] >= 0.5, "the tiny config should learn"
    assert py(root, env, "gate").stdout.strip().endswith("rule(s) hold against HEAD")
    promoted = py(root, env, "promote")
    assert (
        "promote: mnist-lstm version 1 " in promoted.stdout
        and "is now @champion" in promoted.stdout
    )
    mlflow, client = registry(root)
    version = client.get_model_version_by_alias("mnist-lstm", "champion")
    assert str(version.version) == "1"
    # The run was made before the results were committed: it names the commit it ran on.
    assert (
        version.tags["git.commit"] == run(["git", "rev-parse", "HEAD~1"], root, env).stdout.strip()
    )
    assert version.tags["previous_champion_version"] == "none"
    model = mlflow.pyfunc.load_model("models:/mnist-lstm@champion")
    holdout = np.load(root / "data" / "processed" / "mnist.npz")["x_holdout"]
    assert model.predict(holdout).shape == (10, 10)


def test_a_worse_experiment_runs_but_fails_gate_and_promotion_leaving_champion(project):
    root, env = project
    # `dvc exp run` itself must succeed: a worse experiment is still a valid experiment.
    run(["dvc", "exp", "run", "-S", "train.epochs=1"], root, env)
    worse = json.loads((root / "reports" / "metrics.json").read_text())
    baseline = json.loads(run(["git", "show", "HEAD:reports/metrics.json"], root, env).stdout)
    assert worse["val_accuracy"] < baseline["val_accuracy"] - 0.05

    gated = py(root, env, "gate", check=False)
    assert gated.returncode == 1
    lines = gated.stdout.strip().splitlines()
    assert any(line.startswith("| val_accuracy |") and "**FAIL**" in line for line in lines)
    assert lines[-1].startswith("gate: FAILED: val_accuracy")

    promoted = py(root, env, "promote", check=False)
    assert promoted.returncode == 1
    assert "nothing registered; champion stays at version 1" in promoted.stdout
    _, client = registry(root)
    assert str(client.get_model_version_by_alias("mnist-lstm", "champion").version) == "1"
    assert len(client.search_model_versions("name='mnist-lstm'")) == 1


def test_promoting_again_records_the_previous_champion(project):
    root, env = project
    run(["git", "checkout", "params.yaml"], root, env)  # undo the experiment's params
    restored = run(["dvc", "repro"], root, env)
    assert (
        "Running stage 'train'" not in restored.stdout
    )  # DVC's run-cache brings v1's outputs back
    promoted = py(root, env, "promote")  # equal to the champion: within every allowance
    assert "version 2 " in promoted.stdout and "was version 1" in promoted.stdout
    _, client = registry(root)
    version = client.get_model_version_by_alias("mnist-lstm", "champion")
    assert str(version.version) == "2" and version.tags["previous_champion_version"] == "1"
