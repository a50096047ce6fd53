"""The real `dvc repro` on a tiny-data copy of the repo, then the real MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import (
    LEARNS,
    edited,
    expected_kernel,
    locked_model_md5,
    make_project,
    run,
    stages_run,
)

pytestmark = pytest.mark.e2e


# The tiny bands learnt within seconds (conftest.LEARNS: Adam, 10 epochs): ~0.97 of the 30
# validation images and all 10 held out, where chance is 0.1 -- so a floor of 0.8 is one a model
# that learnt nothing, or an evaluate that scores the wrong thing, cannot pass.
ACCURACY_FLOOR = 0.8


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return make_project(tmp_path_factory.mktemp("project"), **LEARNS)


@dataclass(frozen=True)
class Repro:
    """The module's first `dvc repro` and what it left, read right after it: later tests add runs
    (`dvc exp run`) and change the workspace, and may run before or after any test here."""

    result: subprocess.CompletedProcess
    run_ids: list[str]
    metrics: dict
    lock: dict
    head: str


@pytest.fixture(scope="module")
def first_repro(project) -> Repro:
    root, env = project
    assert not (root / "mlflow.db").exists()  # every run in the store comes from this repro
    result = run(["dvc", "repro"], root, env)
    return Repro(
        result=result,
        run_ids=[r.info.run_id for r in mlflow_runs(root)[2]],
        metrics=json.loads((root / "reports" / "metrics.json").read_text()),
        lock=yaml.safe_load((root / "dvc.lock").read_text()),
        head=run(["git", "rev-parse", "HEAD"], root, env).stdout.strip(),
    )


def mlflow_runs(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lstm")
    return client, experiment, client.search_runs([experiment.experiment_id])


def first_run(root: Path, first_repro: Repro):
    """The one run the first `dvc repro` logged."""
    (run_id,) = first_repro.run_ids
    client, _, _ = mlflow_runs(root)
    return client.get_run(run_id)


def test_repro_prints_summary_epochs_metrics_and_holdout_lines(first_repro):
    out = first_repro.result.stdout
    for stage in ("fetch", "normalize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert "Total params" in out
    # params.yaml says auto: the fused op where this environment has it, Keras' LSTM otherwise.
    kernel_lines = [line for line in out.splitlines() if line.startswith("train: LSTM kernel ")]
    assert len(kernel_lines) == 1
    assert kernel_lines[0].startswith(f"train: LSTM kernel {expected_kernel()} (")
    assert re.search(
        r"^\d+/\d+ - .* - loss: .* - val_accuracy: ", out, re.MULTILINE
    )  # the epoch line
    assert "val_accuracy" in out
    holdout = [line for line in out.splitlines() if line.startswith("[") and line[1:2].isdigit()]
    assert len(holdout) == 10
    assert all(line[1] in "0123456789" and line[2:4] == "] " for line in holdout)
    # "[prediction] label": the printed predictions score what metrics.json says they score.
    right = sum(line[1] == line[4:].strip() for line in holdout)
    assert right / 10 == pytest.approx(first_repro.metrics["holdout_accuracy"]), holdout


def test_repro_writes_every_declared_output(project, first_repro):
    root, _ = project
    metrics = first_repro.metrics
    assert {"val_accuracy", "val_loss", "holdout_accuracy"} <= metrics.keys()
    assert (
        metrics["val_accuracy"] >= ACCURACY_FLOOR and metrics["holdout_accuracy"] >= ACCURACY_FLOOR
    )
    for name in (
        "per_class.csv",
        "confusion_matrix.csv",
        "holdout_predictions.csv",
        "confusion_matrix.png",
        "training_curves.png",
    ):
        assert (root / "reports" / name).stat().st_size > 0
    holdout = (root / "reports" / "holdout_predictions.csv").read_text().splitlines()
    assert holdout[0] == "index,label,prediction,confidence" and len(holdout) == 11


def test_evaluate_scores_what_the_model_file_really_predicts(project, first_repro):
    """metrics.json against an independent count: the model file DVC locked, on the validation
    images, with Keras alone (not evaluate's code)."""
    import keras

    root, _ = project
    # The workspace's model and metrics, whichever run they are from by now: a pair either way.
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    data = np.load(root / "data" / "processed" / "mnist.npz")
    model = keras.models.load_model(root / "models" / "model.keras")
    for split in ("val", "holdout"):
        predicted = model.predict(data[f"x_{split}"], verbose=0).argmax(axis=1)
        right = (predicted == data[f"y_{split}"]).mean()
        assert metrics[f"{split}_accuracy"] == pytest.approx(right, abs=1e-6), split


def test_one_run_holds_params_epoch_metrics_tags_and_artifacts(project, first_repro):
    root, _ = project
    client, _, _ = mlflow_runs(root)
    run = first_run(root, first_repro)  # exactly one, whatever ran before
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "10" and run.data.params["train.units"] == "16"
    assert run.data.params["normalize.holdout_size"] == "10"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 10
    metrics = first_repro.metrics
    for key in ("val_accuracy", "val_loss", "holdout_accuracy"):
        assert run.data.metrics[f"eval/{key}"] == pytest.approx(metrics[key])

    tags = run.data.tags
    head = first_repro.head
    assert tags["git.commit"] == head
    # make_project committed everything, and `dvc repro` writes only untracked files (dvc.lock,
    # outputs): a clean tree. The dirty case is the `dvc exp run` test's.
    assert tags["git.dirty"] == "false"
    assert tags["train.lstm_kernel_used"] == expected_kernel()
    provenance = json.loads((root / "data" / "raw" / "provenance.json").read_text())
    assert tags["data.raw_sha256"] == provenance["raw_sha256"]
    assert tags["data.fetch_source"] == "path"
    # The run carries the very hashes dvc.lock records, so each finds the other.
    lock = first_repro.lock["stages"]
    for tag, stage, path in [
        ("dvc.raw_md5", "fetch", "data/raw/mnist.npz"),
        ("dvc.processed_md5", "normalize", "data/processed/mnist.npz"),
        ("dvc.model_md5", "train", "models/model.keras"),
    ]:
        locked = next(out["md5"] for out in lock[stage]["outs"] if out["path"] == path)
        assert tags[tag] == locked, tag
    assert run.info.run_name == f"lstm16-bn-adam-lr0.02-bs16-e10@{head[:7]}"
    snapshot = json.loads(
        Path(client.download_artifacts(run.info.run_id, "params.json")).read_text()
    )
    assert snapshot["train.units"] == 16 and snapshot["normalize.holdout_size"] == 10

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {
        "reports/confusion_matrix.png",
        "reports/training_curves.png",
        "reports/holdout_predictions.csv",
        "reports/per_class.csv",
    } <= artifacts
    # Artifacts live beside the store under the repo root, not wherever the stage ran.
    assert run.info.artifact_uri.startswith((root / "mlartifacts").as_uri())


def test_logged_model_reloads_with_signature_and_input_example(project, first_repro, caplog):
    import keras
    import mlflow
    import tensorflow as tf

    from mnist_lstm.contracts import md5_file
    from mnist_lstm.lineage import locked_hashes
    from mnist_lstm.tracking import TAG_MODEL_MD5

    root, _ = project
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    _, experiment, _ = mlflow_runs(root)
    (run_id,) = first_repro.run_ids
    models = mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id], output_format="list"
    )
    models = [m for m in models if m.source_run_id == run_id]
    assert len(models) == 1
    # Platform-neutral requirements: `tensorflow` (every platform), never `tensorflow-cpu`.
    local = Path(mlflow.artifacts.download_artifacts(models[0].model_uri))
    # Its Keras archive is the very file DVC tracks: what `make promote` hashes against dvc.lock.
    assert (
        md5_file(local / "data" / "model.keras") == locked_hashes(first_repro.lock)[TAG_MODEL_MD5]
    )
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == [
        f"mlflow=={mlflow.__version__}",
        f"tensorflow=={tf.__version__}",
        f"keras=={keras.__version__}",
    ]
    # Loading in an environment with those packages warns of nothing (MLflow compares them).
    with caplog.at_level("WARNING", logger="mlflow"):
        model = mlflow.pyfunc.load_model(models[0].model_uri)
    assert not [r for r in caplog.records if "mismatch" in r.getMessage()]
    assert model.metadata.signature is not None
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    example = model.input_example
    assert example.shape[1:] == (28, 28)
    holdout = np.load(root / "data" / "processed" / "mnist.npz")["x_holdout"]
    assert model.predict(holdout).shape == (10, 10)


def test_second_repro_runs_no_stage_and_logs_no_run(project, first_repro):
    root, env = project
    before = {r.info.run_id for r in mlflow_runs(root)[2]}
    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert {r.info.run_id for r in mlflow_runs(root)[2]} == before
    assert "changed" not in run(["dvc", "status"], root, env).stdout


def test_metrics_show_lists_the_committed_metric_file(project, first_repro):
    root, env = project
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env).stdout)
    # {"": {"data": {"reports/metrics.json": {"data": {...}}}}}: the workspace's metrics file.
    (workspace,) = shown.values()
    listed = workspace["data"]["reports/metrics.json"]["data"]
    assert listed == json.loads((root / "reports" / "metrics.json").read_text())
    assert listed["val_accuracy"] >= ACCURACY_FLOOR


def test_bad_param_stops_dvc_repro_with_one_clear_line(project, first_repro):
    root, env = project
    with edited(root / "params.yaml", "epochs: 10", "epochs: '10'"):
        result = run(["dvc", "repro"], root, env, check=False)
        assert result.returncode != 0
        assert "error: params.yaml: train.epochs must be an integer >= 1, got '10'" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    # The last good run's outputs come back from DVC's cache without retraining.
    restored = run(["dvc", "repro"], root, env)
    assert "Running stage 'train'" not in restored.stdout
    assert "changed" not in run(["dvc", "status"], root, env).stdout


def lineage(root: Path, env: dict[str, str], *args: str, check: bool = True):
    return run(["python", "-m", "mnist_lstm.lineage", *args], root, env, check=check)


def test_lineage_of_the_workspace_leads_back_to_commit_data_and_metrics(project, first_repro):
    root, env = project
    out = lineage(root, env).stdout
    (run_id,) = first_repro.run_ids
    assert f"run        {run_id}" in out
    assert f"commit     {first_repro.head}" in out
    assert "params     as in params.yaml at HEAD" in out
    assert f"models/model.keras: {locked_model_md5(root)}" in out
    assert "eval/val_accuracy" in out
    assert "reproduces yes" in out
    # The same answer from the run id.
    assert lineage(root, env, run_id).stdout == out


def test_lineage_says_when_the_workspace_no_longer_reproduces_the_run(project, first_repro):
    root, env = project
    with edited(root / "params.yaml", "units: 16", "units: 8"):
        out = lineage(root, env).stdout
    assert "reproduces no: `dvc status` reports changed stages" in out


def test_lineage_of_an_unknown_run_is_one_clear_line(project, first_repro):
    root, env = project
    result = lineage(root, env, "0" * 32, check=False)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {'0' * 32}: not found in sqlite:///")
    )


def test_dvc_exp_run_tags_its_run_with_the_experiment_and_baseline(project, first_repro):
    root, env = project
    head = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    result = run(["dvc", "exp", "run", "-n", "units-eight", "-S", "train.units=8"], root, env)
    assert stages_run(result) == ["train", "evaluate"]
    client, experiment, runs = mlflow_runs(root)
    tagged = [r for r in runs if r.data.tags.get("dvc.dvc_exp_name") == "units-eight"]
    assert len(tagged) == 1
    assert tagged[0].data.tags["dvc.dvc_exp_baseline_rev"] == head
    assert tagged[0].data.params["train.units"] == "8"
    # `-S` edits the committed params.yaml before the stages run: the tree is dirty, and says so.
    assert tagged[0].data.tags["git.dirty"] == "true"
    assert tagged[0].info.run_name.startswith("units-eight:lstm8-")
    assert tagged[0].info.run_name.endswith(f"@{head[:7]}+dirty")
    assert "eval/val_accuracy" in tagged[0].data.metrics
    # `dvc exp apply` brings an experiment back into the workspace.
    run(["git", "checkout", "params.yaml"], root, env)
    run(["dvc", "exp", "apply", "units-eight"], root, env)
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["units"] == 8
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env).stdout


def test_dvc_plots_show_renders_curves_and_confusion_matrix(project, first_repro):
    root, env = project
    out = root / "plots_html"
    run(["dvc", "plots", "show", "-o", str(out)], root, env)
    html = (out / "index.html").read_text()
    for title in ("Loss per epoch", "Accuracy per epoch", "Validation confusion matrix"):
        assert title in html
    assert "confusion_matrix.png" in html and "training_curves.png" in html
    assert "true digit" in html and "predicted digit" in html
    diff = run(["dvc", "plots", "diff", "HEAD", "-o", str(root / "plots_diff")], root, env)
    assert (root / "plots_diff" / "index.html").exists(), diff.stdout


def test_a_bad_override_from_dvc_exp_run_is_one_line_and_loses_nothing(project, first_repro):
    root, env = project
    run(["git", "checkout", "params.yaml"], root, env)  # back to the committed configuration
    run(["dvc", "repro"], root, env)
    lock, model = (root / "dvc.lock").read_bytes(), (root / "models" / "model.keras").read_bytes()
    failed = run(["dvc", "exp", "run", "-S", "train.epochs=0"], root, env, check=False)
    assert failed.returncode != 0
    assert "error: params.yaml: train.epochs must be an integer >= 1, got 0" in failed.stderr
    assert "Traceback" not in failed.stderr + failed.stdout
    run(["git", "checkout", "params.yaml"], root, env)  # the user puts the value back
    restored = run(["dvc", "repro"], root, env)
    assert "Running stage 'train'" not in restored.stdout  # from DVC's cache, not retrained
    assert (root / "dvc.lock").read_bytes() == lock
    assert (root / "models" / "model.keras").read_bytes() == model


def test_logged_tags_carry_no_absolute_paths(project, first_repro):
    root, _ = project
    _, _, all_runs = mlflow_runs(root)
    for logged in all_runs:
        values = list(logged.data.tags.values()) + list(logged.data.params.values())
        assert not [
            v for v in values if str(root) in v or v.startswith(os.path.expanduser("~") + "/")
        ]
