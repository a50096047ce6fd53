"""The only module that imports mlflow: where runs live, how stages hand a run over, what it holds.

One run covers one pipeline execution: `train` opens it, logs params, per-epoch metrics and the
model, and tags it with the sha256 of the model file it wrote. `evaluate` hashes the model file it
is given and logs into the run carrying that tag, so the hand-over holds even when DVC restores
train's outputs from its cache instead of running it -- and no run id ever lands in a DVC output.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Set before mlflow is imported: it reads these once. The project must work fully offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model, infer_signature  # noqa: E402

from mnist_lstm.errors import UserError  # noqa: E402

EXPERIMENT = "mnist-lstm"
MODEL_NAME = "model"
TAG_MODEL_SHA = "mnist_lstm.model_sha256"
EVAL_PREFIX = "eval/"
_EXPS_TEMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


class TrackingError(UserError):
    """The MLflow store cannot be used; raised before any training starts."""


def project_root(cwd: Path | None = None) -> Path:
    """The repo root, also from inside the temporary copies `dvc exp run --queue` works in."""
    cwd = Path(cwd or os.getcwd()).resolve()
    text = str(cwd)
    if _EXPS_TEMP in text:
        return Path(text.split(_EXPS_TEMP, 1)[0])
    return cwd


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the repo's own sqlite store `mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local sqlite store (not wherever the process happens to run)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def connect() -> str:
    """Point mlflow at the store and make sure the experiment exists; fail fast if it cannot."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            with contextlib.suppress(MlflowException):  # another writer created it meanwhile
                mlflow.create_experiment(EXPERIMENT, artifact_location=_artifact_location(uri))
        experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(f"MLflow tracking URI {uri}: cannot be used ({first_line})") from None
    return experiment_id


def git_tags(root: Path) -> dict[str, str]:
    """The commit the code came from and whether the tree had uncommitted changes."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {
        "mlflow.source.git.commit": commit or "none",
        "git.commit": commit or "none",
        "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
    }


def dvc_experiment_tags() -> dict[str, str]:
    names = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
    return {f"dvc.{name.lower()}": os.environ[name] for name in names if os.environ.get(name)}


class EpochMetrics(keras.callbacks.Callback):
    """Logs Keras' per-epoch logs (loss, accuracy, val_loss, val_accuracy) to the active run."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs:
            mlflow.log_metrics({key: float(value) for key, value in logs.items()}, step=epoch)


class _KerasFlavor:
    """`mlflow.keras` with its save folder created first.

    In mlflow 3.17 `mlflow.keras.save_model` writes the input example before it creates the model
    folder, so `log_model(input_example=...)` fails; creating the folder first is all it lacks.
    """

    @staticmethod
    def save_model(path: str, **kwargs: Any) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def _requirements() -> list[str]:
    # Pinned from this environment instead of inferred: inference reloads the model in a
    # subprocess, and the pins are what the model was actually trained and tested with.
    pins = []
    for dist in ("keras", "tensorflow-cpu", "tensorflow", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
    return pins


def log_model(model: keras.Model, input_example: np.ndarray) -> str:
    """Log the model (mlflow.keras flavor) with a signature and an input example; its URI."""
    signature = infer_signature(input_example, model.predict(input_example, verbose=0))
    # MLflow test-predicts the example through pyfunc; keep its progress bars out of the log.
    keras.utils.disable_interactive_logging()
    try:
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=_KerasFlavor,
            flavor_name="mlflow.keras",
            model=model,
            signature=signature,
            input_example=input_example,
            pip_requirements=_requirements(),
        )
    finally:
        keras.utils.enable_interactive_logging()
    return info.model_uri


def log_training(
    model: keras.Model, input_example: np.ndarray, model_sha256: str, train_seconds: float, epochs: int
) -> None:
    """After fitting: timing, the model itself, and the tag that lets `evaluate` find this run."""
    mlflow.log_metrics(
        {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(epochs, 1)}
    )
    log_model(model, input_example)
    # Tagged last: a run carries the tag only once everything evaluate relies on is logged.
    mlflow.set_tag(TAG_MODEL_SHA, model_sha256)


@contextlib.contextmanager
def training_run(run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[str]:
    """Open the pipeline's run, log params and lineage tags; yield the run id."""
    connect()
    root = project_root()
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(params)
        mlflow.set_tags({**git_tags(root), **dvc_experiment_tags(), **tags})
        mlflow.log_dict(params, "params.json")
        yield run.info.run_id


def find_run_by_model(model_sha256: str) -> str | None:
    """The newest run whose train stage wrote a model file with this sha256, if any."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.`{TAG_MODEL_SHA}` = '{model_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def evaluation_run(model_sha256: str, fallback_name: str) -> Iterator[tuple[str, bool]]:
    """Reopen the run that trained this model file; a new run if none has (e.g. a new store).

    Yields (run id, whether it is the training run).
    """
    connect()
    run_id = find_run_by_model(model_sha256)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id):
            yield run_id, True
        return
    with mlflow.start_run(run_name=fallback_name) as run:
        mlflow.set_tags(
            {**git_tags(project_root()), **dvc_experiment_tags(), TAG_MODEL_SHA: model_sha256}
        )
        yield run.info.run_id, False


def log_evaluation(
    metrics: dict[str, float], artifacts: list[Path], tags: dict[str, str]
) -> None:
    """Final metrics, report files and data lineage tags into the active run.

    Metrics go under `eval/` (`eval/val_accuracy`): plain `val_accuracy` is training's per-epoch
    series, and a final point appended to it would read as an extra epoch.
    """
    mlflow.log_metrics({f"{EVAL_PREFIX}{key}": value for key, value in metrics.items()})
    mlflow.set_tags(tags)
    for path in artifacts:
        mlflow.log_artifact(str(path), artifact_path="reports")


def run_url(run_id: str) -> str:
    """Where the run is in the UI that `make ui` starts, or the run's id for a remote store."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    uri = tracking_uri()
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
