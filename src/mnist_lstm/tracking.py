"""The only module that imports mlflow: where runs live, how stages hand a run over, what it holds.

One run covers one pipeline execution: `train` opens it, logs params, per-epoch metrics and the
model, and tags it with the md5 of the model file it wrote -- the hash dvc.lock records for it.
`evaluate` hashes the model file it is given and logs into the newest run carrying that tag, so the
hand-over holds even when DVC restores train's outputs from its cache instead of running it, no run
id ever lands in a DVC output, and the hash in dvc.lock finds the run(s) that made those bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Set before mlflow is imported: it reads these once. The project must work fully offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow's HTTP client retries 7 times with exponential backoff (minutes) by default; an
# unreachable tracking server must fail the stage in seconds, before training starts.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
# Stage logs and the predict CLI's output stay readable: no per-file download bars.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model, infer_signature  # noqa: E402

from mnist_lstm.errors import UserError  # noqa: E402
from mnist_lstm.runtime import keras, tf  # noqa: E402

EXPERIMENT = "mnist-lstm"
MODEL_NAME = "model"
# Lineage tags: the md5 hashes dvc.lock records for each stage's data output.
TAG_RAW_MD5 = "dvc.raw_md5"
TAG_PROCESSED_MD5 = "dvc.processed_md5"
TAG_MODEL_MD5 = "dvc.model_md5"
# The LSTM kernel training used (onednn or keras): `lstm_kernel: auto` differs by machine.
TAG_LSTM_KERNEL = "train.lstm_kernel_used"
# Which live process owns a RUNNING run: lets the next pipeline spot runs orphaned by `kill -9`.
TAG_PID = "mnist_lstm.pid"
TAG_HOST = "mnist_lstm.host"
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


def connect(attempts: int = 5) -> str:
    """Point mlflow at the store and make sure the experiment exists; fail fast if it cannot.

    Parallel `dvc exp` workers may race to create the sqlite schema or the experiment on a new
    store; such a collision is retried a few times instead of failing a run.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    for attempt in range(attempts):
        try:
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:
                with contextlib.suppress(MlflowException):  # another writer created it meanwhile
                    mlflow.create_experiment(EXPERIMENT, artifact_location=_artifact_location(uri))
            return mlflow.set_experiment(EXPERIMENT).experiment_id
        except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
            text = str(err)
            if attempt + 1 < attempts and ("locked" in text or "already exists" in text):
                time.sleep(0.5 * (attempt + 1))
                continue
            first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            raise TrackingError(
                f"MLflow tracking URI {uri}: cannot be used ({first_line})"
            ) from None
    raise AssertionError("unreachable")


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
    """Logs Keras' per-epoch logs (loss, accuracy, val_loss, val_accuracy) and the epoch's
    wall-clock seconds (training + validation, what `make bench` compares) to the active run."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        mlflow.log_metrics(metrics, step=epoch)


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
    """Pinned from this environment instead of inferred (inference reloads the model in a
    subprocess); the pins are what the model was trained and tested with. Named by the
    platform-neutral distributions, whatever this machine installed: `tensorflow` ships for Linux,
    macOS and Windows (CPU and GPU), `tensorflow-cpu` for two of them. NumPy is left to
    TensorFlow's own bounds: its newest release differs by Python version."""
    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]


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
    model: keras.Model,
    input_example: np.ndarray,
    lineage: dict[str, str],
    train_seconds: float,
    epochs: int,
) -> None:
    """After fitting: timing, the model itself, and the tags that let `evaluate` find this run."""
    mlflow.log_metrics(
        {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(epochs, 1)}
    )
    log_model(model, input_example)
    # Tagged last: a run carries the model hash only once everything evaluate relies on is logged.
    mlflow.set_tags(lineage)


def _owner_tags() -> dict[str, str]:
    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_orphaned_runs() -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this host is gone (e.g. after `kill -9`)."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    client = mlflow.MlflowClient()
    orphaned = []
    host = socket.gethostname()
    for run in client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"
    ):
        tags = run.data.tags
        pid = tags.get(TAG_PID, "")
        if tags.get(TAG_HOST) == host and pid.isdigit() and not _alive(int(pid)):
            client.set_tag(
                run.info.run_id, "mnist_lstm.orphaned", f"process {pid} died while running"
            )
            client.set_terminated(run.info.run_id, status="FAILED")
            orphaned.append(run.info.run_id)
    return orphaned


@contextlib.contextmanager
def _run(**start_kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """An active run that ends FINISHED, FAILED on an error, or KILLED on SIGINT/SIGTERM."""
    tags = {
        **start_kwargs.pop("tags", {}),
        **_owner_tags(),
        # MLflow records the absolute script path here; the module name says as much, portably.
        "mlflow.source.name": os.path.basename(sys.argv[0])
        if sys.argv and sys.argv[0]
        else "python",
    }
    run = mlflow.start_run(**start_kwargs, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@contextlib.contextmanager
def training_run(
    run_name: str, params: dict[str, Any], facts: dict[str, str] | None = None
) -> Iterator[str]:
    """Open the pipeline's run, log params, the params snapshot and git lineage; yield its id.

    `facts` are tags about how this run trained (devices, global batch): not params, because
    params.yaml does not set them and lineage compares the run's params with params.yaml."""
    connect()
    for run_id in fail_orphaned_runs():
        print(f"tracking: run {run_id} was left RUNNING by a process that died; marked FAILED")
    tags = {**git_tags(project_root()), **dvc_experiment_tags(), **(facts or {})}
    params = {key: _portable(value) for key, value in params.items()}
    # The short commit tells apart runs of the same configuration made from different code.
    name = f"{run_name}@{tags['git.commit'][:7]}{'+dirty' if tags['git.dirty'] == 'true' else ''}"
    with _run(run_name=name) as run:
        mlflow.log_params(params)
        mlflow.set_tags(tags)
        mlflow.log_dict(params, "params.json")
        yield run.info.run_id


def _portable(value: Any) -> Any:
    """Params are shared with a team: a path under the home directory is logged as `~/...`."""
    home = os.path.expanduser("~")
    if isinstance(value, str) and home not in ("", "/") and value.startswith(home + os.sep):
        return "~" + value[len(home) :]
    return value


def find_runs_by_model(model_md5: str, max_results: int = 1) -> list[str]:
    """The runs (newest first) whose train stage wrote a model file with this md5."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.`{TAG_MODEL_MD5}` = '{model_md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
        output_format="list",
    )
    return [run.info.run_id for run in runs]


@contextlib.contextmanager
def evaluation_run(model_md5: str, fallback_name: str) -> Iterator[tuple[str, bool]]:
    """Reopen the newest run that trained this model file; a new run if none has (a new store).

    Yields (run id, whether it is the training run).
    """
    connect()
    found = find_runs_by_model(model_md5)
    if found:
        with _run(run_id=found[0]):
            yield found[0], True
        return
    with _run(run_name=fallback_name) as run:
        mlflow.set_tags(
            {**git_tags(project_root()), **dvc_experiment_tags(), TAG_MODEL_MD5: model_md5}
        )
        yield run.info.run_id, False


def log_evaluation(metrics: dict[str, float], artifacts: list[Path], tags: dict[str, str]) -> None:
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


def resolve_run(ref: str) -> str:
    """A run id from a run id, `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    connect()
    client = mlflow.MlflowClient()
    try:
        if ref.startswith("models:/"):
            name, _, rest = ref[len("models:/") :].partition("/")
            if "@" in name and not rest:
                name, alias = name.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                version = client.get_model_version(name, rest)
            if not version.run_id:
                raise TrackingError(f"{ref}: the model version has no source run")
            return version.run_id
        return client.get_run(ref).info.run_id
    except MlflowException as err:
        first_line = str(err).strip().splitlines()[0]
        raise TrackingError(f"{ref}: not found in {tracking_uri()} ({first_line})") from None


def describe_run(run_id: str) -> dict[str, Any]:
    """What lineage prints: identity, params, metrics and tags of one run."""
    run = mlflow.MlflowClient().get_run(run_id)
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "start_time_ms": run.info.start_time,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


# --- Model Registry: every registry call of the project lives below. ---

REGISTERED_MODEL = "mnist-lstm"
CHAMPION = "champion"


def champion() -> dict[str, Any] | None:
    """The current champion: its version, run id and final metrics; None when there is none."""
    connect()
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise TrackingError(f"{tracking_uri()}: cannot read the registry ({err})") from None
    return {
        "version": str(version.version),
        "run_id": version.run_id,
        "metrics": logged_metrics(version.run_id) if version.run_id else {},
    }


def logged_metrics(run_id: str) -> dict[str, float]:
    """The final evaluation metrics a run logged, named as in reports/metrics.json."""
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    return {
        key[len(EVAL_PREFIX) :]: value
        for key, value in metrics.items()
        if key.startswith(EVAL_PREFIX)
    }


def promote(run_id: str, previous_version: str | None) -> str:
    """Register the run's model as a new version, move `champion` to it; the new version."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    if not models:
        raise TrackingError(f"run {run_id}: has no logged model to register")
    version = mlflow.register_model(
        f"models:/{models[0].model_id}",
        REGISTERED_MODEL,
        tags={
            "git.commit": run.data.tags.get("git.commit", "unknown"),
            "previous_champion_version": str(previous_version or "none"),
            "source_run_id": run_id,
        },
    )
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
    return str(version.version)


def load_model(uri: str) -> keras.Model:
    """A Keras model from an MLflow URI (`models:/mnist-lstm@champion`, `runs:/…`, `models:/m-…`),
    read from the configured tracking server or the repo's store."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.keras.load_model(uri)
    except MlflowException as err:
        raise TrackingError(f"{uri}: cannot load from {tracking_uri()} ({err.message})") from None
    except OSError as err:
        raise TrackingError(f"{uri}: cannot load from {tracking_uri()} ({err})") from None
