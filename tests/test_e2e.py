"""The real `dvc repro` on a temporary copy of the repo with tiny data, then the real MLflow store."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
COPIED = ["dvc.yaml", "params.yaml", "src", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"]


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git+DVC copy of the repo whose params point at tiny data and train for 1 epoch."""
    from conftest import make_tiny_raw

    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target)
    fixture = root / "fixtures" / "tiny_mnist.npz"
    fixture.parent.mkdir()
    np.savez(fixture, **make_tiny_raw(n_train=200, n_test=40))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fetch"].update(source="path", path="fixtures/tiny_mnist.npz")
    params["train"].update(epochs=1, batch_size=32, units=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # The copy's own code runs, not the editable install's.
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(root / "src"))
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], root, env)
    return root, env


@pytest.fixture(scope="module")
def first_repro(project):
    root, env = project
    return run(["dvc", "repro"], root, env)


def mlflow_runs(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lstm")
    return client, experiment, client.search_runs([experiment.experiment_id])


def test_repro_prints_summary_epochs_metrics_and_holdout_lines(first_repro):
    out = first_repro.stdout
    for stage in ("fetch", "normalize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert "Total params" in out
    assert re.search(r"^\d+/\d+ - .* - loss: .* - val_accuracy: ", out, re.MULTILINE)  # the epoch line
    assert "val_accuracy" in out
    holdout = [line for line in out.splitlines() if line.startswith("[") and line[1:2].isdigit()]
    assert len(holdout) == 10
    assert all(line[1] in "0123456789" and line[2:4] == "] " for line in holdout)


def test_repro_writes_every_declared_output(project, first_repro):
    root, _ = project
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert {"val_accuracy", "val_loss", "holdout_accuracy"} <= metrics.keys()
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    for name in ("per_class.csv", "confusion_matrix.csv", "holdout_predictions.csv",
                 "confusion_matrix.png", "training_curves.png"):
        assert (root / "reports" / name).stat().st_size > 0
    holdout = (root / "reports" / "holdout_predictions.csv").read_text().splitlines()
    assert holdout[0] == "index,label,prediction,confidence" and len(holdout) == 11


def test_one_run_holds_params_epoch_metrics_tags_and_artifacts(project, first_repro):
    root, _ = project
    client, experiment, runs = mlflow_runs(root)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["train.units"] == "16"
    assert run.data.params["fetch.source"] == "path"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 1
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for key in ("val_accuracy", "val_loss", "holdout_accuracy"):
        assert run.data.metrics[f"eval/{key}"] == pytest.approx(metrics[key])

    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    assert tags["git.commit"] == head.stdout.strip()
    assert tags["git.dirty"] in ("true", "false")
    provenance = json.loads((root / "data" / "raw" / "provenance.json").read_text())
    assert tags["data.raw_sha256"] == provenance["raw_sha256"]
    assert tags["data.fetch_source"] == "path"
    from mnist_lstm.contracts import sha256_file

    assert tags["mnist_lstm.model_sha256"] == sha256_file(root / "models" / "model.keras")

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/confusion_matrix.png", "reports/training_curves.png",
            "reports/holdout_predictions.csv", "reports/per_class.csv"} <= artifacts
    # Artifacts live beside the store under the repo root, not wherever the stage ran.
    assert run.info.artifact_uri.startswith((root / "mlartifacts").as_uri())


def test_logged_model_reloads_with_signature_and_input_example(project, first_repro):
    import mlflow

    root, _ = project
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    _, experiment, runs = mlflow_runs(root)
    models = mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id], output_format="list"
    )
    assert len(models) == 1 and models[0].source_run_id == runs[0].info.run_id
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    assert model.metadata.signature is not None
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    example = model.input_example
    assert example.shape[1:] == (28, 28)
    holdout = np.load(root / "data" / "processed" / "mnist.npz")["x_holdout"]
    assert model.predict(holdout).shape == (10, 10)


def test_second_repro_runs_no_stage_and_logs_no_run(project, first_repro):
    root, env = project
    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert len(mlflow_runs(root)[2]) == 1
    assert "changed" not in run(["dvc", "status"], root, env).stdout


def test_metrics_show_lists_the_committed_metric_file(project, first_repro):
    root, env = project
    shown = run(["dvc", "metrics", "show", "--json"], root, env).stdout
    assert "val_accuracy" in shown and "reports/metrics.json" in shown


def test_bad_param_stops_dvc_repro_with_one_clear_line(project, first_repro):
    root, env = project
    params = root / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("epochs: 1", "epochs: '1'"))
        result = run(["dvc", "repro"], root, env, check=False)
        assert result.returncode != 0
        assert "error: params.yaml: train.epochs must be an integer >= 1, got '1'" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    finally:
        params.write_text(original)
    # The last good run's outputs come back from DVC's cache without retraining.
    restored = run(["dvc", "repro"], root, env)
    assert "Running stage 'train'" not in restored.stdout
    assert "changed" not in run(["dvc", "status"], root, env).stdout
