"""The only module that imports mlflow: where runs live, how stages hand a run over, what it holds.

One run covers one pipeline execution: `train` opens it, logs params, per-epoch metrics and the
model, and tags it with the md5 of the model file it wrote -- the hash dvc.lock records for it.
`evaluate` hashes the model file it is given and logs into the newest run carrying that tag, so the
hand-over holds even when DVC restores train's outputs from its cache instead of running it, no run
id ever lands in a DVC output, and the hash in dvc.lock finds the run(s) that made those bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
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
# Our own lines say where a run is (or waits); MLflow's "View run at" would repeat it per stage.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# A store going down is reported once, in one line (RunWriter), not as a warning per HTTP retry.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
# ... nor as the traceback MLflow logs for a database error (sqlite locked past its timeout).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from mlflow.entities import (  # noqa: E402
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model, infer_signature  # noqa: E402
from mlflow.tracking.context import registry as context_registry  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # noqa: E402

from mnist_lstm import spool  # noqa: E402
from mnist_lstm.errors import UserError, interrupts_held  # noqa: E402
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

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


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


def connect(attempts: int = 5, uri: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists, marked as a model-training
    experiment for MLflow's UI; fail fast, naming the URI, if the store cannot be used.

    Parallel `dvc exp` workers may race to create the sqlite schema or the experiment on a new
    store; such a collision is retried a few times instead of failing a run.
    """
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    for attempt in range(attempts):
        try:
            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                with contextlib.suppress(MlflowException):  # another writer created it meanwhile
                    client.create_experiment(
                        EXPERIMENT,
                        artifact_location=_artifact_location(uri),
                        tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                    )
                experiment = client.get_experiment_by_name(EXPERIMENT)
            if TAG_EXPERIMENT_KIND not in experiment.tags:  # a store made before the tag
                client.set_experiment_tag(
                    experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
                )
            mlflow.set_experiment(experiment_id=experiment.experiment_id)
            return experiment.experiment_id
        except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
            text = str(err)
            if attempt + 1 < attempts and ("locked" in text or "already exists" in text):
                time.sleep(0.5 * (attempt + 1))
                continue
            reason = _first_line(err)
            raise TrackingError(
                f"MLflow tracking URI {uri}: cannot be used ({reason}); start it, or set "
                f"{TRACKING_MODE_ENV}=offline to keep the run locally and `make sync` later",
                reason,
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
    wall-clock seconds (training + validation, what `make bench` compares) to the run."""

    def __init__(self, run: RunWriter) -> None:
        super().__init__()
        self._run = run

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        self._run.log_metrics(metrics, step=epoch)


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


def log_model(model: keras.Model, input_example: np.ndarray, run_id: str) -> str:
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
            run_id=run_id,
        )
    finally:
        keras.utils.enable_interactive_logging()
    return info.model_uri


def log_training(
    run: RunWriter,
    model: keras.Model,
    model_file: Path,
    input_example: np.ndarray,
    lineage: dict[str, str],
    train_seconds: float,
    epochs: int,
) -> None:
    """After fitting: timing, the model itself, and the tags that let `evaluate` find this run."""
    run.log_metrics(
        {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(epochs, 1)}
    )
    run.log_model(model, model_file, input_example)
    # Tagged last: a run carries the model hash only once everything evaluate relies on is logged.
    run.set_tags(lineage)


# --- Writing to a run: the store while it answers, the spool (spool.py) once it does not. ---

TRACKING_MODE_ENV = "MNIST_LSTM_TRACKING"
# Which MLflow UI view an experiment opens in (3.x tells GenAI from model training by it).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Set on a run created by a sync: a rerun of an interrupted sync finds it instead of a second one.
TAG_SPOOL_ID = "mnist_lstm.spool_id"
# Store answers that are the request's fault, not the store's: never spooled, they would fail again.
_CLIENT_ERRORS = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "INVALID_STATE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ENDPOINT_NOT_FOUND",
    }
)


def offline() -> bool:
    """MNIST_LSTM_TRACKING=offline: log to the spool from the start, `make sync` later."""
    value = os.environ.get(TRACKING_MODE_ENV, "online").strip().lower() or "online"
    if value not in ("online", "offline"):
        raise UserError(f"{TRACKING_MODE_ENV} must be online or offline, got {value!r}")
    return value == "offline"


def _is_outage(err: BaseException) -> bool:
    """A failure of the store or the way to it (down, unreachable, locked past its timeout)."""
    if isinstance(err, MlflowException):
        return err.error_code not in _CLIENT_ERRORS
    return isinstance(err, OSError)


# What an outage looks like in an error's text, and how a line says it.
_OUTAGE_SIGNS = (
    (("Connection refused", "NewConnectionError", "Failed to establish"), "connection refused"),
    (("timed out", "Timeout", "ConnectTimeout"), "timed out"),
    (("database is locked",), "database is locked"),
    (("Name or service not known", "nodename nor servname"), "host not found"),
    (("RemoteDisconnected", "Connection aborted", "Connection reset"), "connection dropped"),
    (("503", "502", "504"), "server unavailable"),
)


def _first_line(err: BaseException) -> str:
    """A short reason: `connection refused` rather than urllib3's paragraph."""
    text = str(err).strip()
    for signs, reason in _OUTAGE_SIGNS:
        if any(sign in text for sign in signs):
            return reason
    return text.splitlines()[0][:200] if text else type(err).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dataset_entity(spec: dict[str, Any]) -> Dataset:
    return Dataset(
        name=spec["name"],
        digest=spec["digest"],
        source_type=spec["source_type"],
        source=spec["source"],
        schema=spec["schema"],
        profile=spec["profile"],
    )


def dataset(
    name: str, path: Path | str, md5: str, x: np.ndarray, y: np.ndarray, context: str
) -> dict[str, Any]:
    """A split of a DVC-tracked file as an MLflow dataset: digest = the md5 dvc.lock records for
    the file, source = its path in the repo; context is training, validation or holdout."""
    # The model reads float32 pixels, however the stage holds them (train keeps uint8 levels).
    signature = infer_signature(x[:1].astype(np.float32), y[:1])
    return {
        "name": name,
        "digest": md5,
        "source_type": "local",
        "source": json.dumps({"uri": Path(path).as_posix()}),
        "schema": json.dumps(
            {
                "mlflow_tensorspec": {
                    "features": signature.inputs.to_json(),
                    "targets": signature.outputs.to_json(),
                }
            }
        ),
        "profile": json.dumps({"features_shape": list(x.shape), "targets_shape": list(y.shape)}),
        "context": context,
    }


def _apply(client: mlflow.MlflowClient, run_id: str, op: dict[str, Any], files: list[Path]) -> None:
    """Perform one write on the store. The same code logs live and replays the spool, so a run
    synced after an outage holds what it would have held without one. Every op can be repeated
    without duplicating anything (an interrupted sync repeats at most one)."""
    kind = op["op"]
    if kind == "params":
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in op["params"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
    elif kind == "metrics":
        # Same key, value, step and timestamp is the same point: the store keeps it once.
        metrics = [
            Metric(k, float(v), op["timestamp"], op["step"]) for k, v in op["metrics"].items()
        ]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "artifact":
        for path in files:  # the same path again overwrites the same artifact
            client.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "inputs":
        # The store keeps one dataset per (name, digest) and one input per dataset and run.
        client.log_inputs(
            run_id,
            datasets=[
                DatasetInput(_dataset_entity(d), [InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])
                for d in op["datasets"]
            ],
        )
    elif kind == "model":
        _replay_model(client, run_id, files)
    elif kind == "status":
        client.update_run(run_id, status=op["status"])
    elif kind == "end":
        client.set_terminated(run_id, status=op["status"], end_time=op["end_time"])
    else:
        raise ValueError(f"unknown tracking op {kind!r}")


def _replay_model(client: mlflow.MlflowClient, run_id: str, files: list[Path]) -> None:
    """Log the spooled model file unless the run already holds a finished logged model (a sync
    interrupted after logging it); a half-uploaded one is marked FAILED, not left PENDING."""
    run = client.get_run(run_id)
    for logged in client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    ):
        if logged.status == LoggedModelStatus.READY:
            return
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
    model_file, example_file = files
    model = keras.models.load_model(model_file, safe_mode=True)
    log_model(model, np.load(example_file), run_id)


class RunWriter:
    """Where a stage's writes to its run go: straight to the store while it answers; once a write
    fails because the store is down or unreachable (after MLflow's bounded retries), that write
    and every later one go, in order, to a spool that `make sync` replays. The stage goes on."""

    def __init__(self, run_id: str, spool_: spool.Spool | None = None, why: str = "") -> None:
        self.uri = tracking_uri()
        self.client = mlflow.MlflowClient(self.uri)
        self.run_id = run_id
        self.spool = spool_
        self._why = why

    @property
    def deferred(self) -> bool:
        return self.spool is not None

    def _defer(self, err: Exception) -> None:
        """From this write on, everything goes to a new spool; one line says so."""
        if not _is_outage(err):
            raise err
        self._why = _first_line(err)
        self.spool = spool.Spool.create(project_root(), self.uri, self.run_id)
        print(
            f"tracking: {self.uri} stopped answering ({self._why}); the run's remaining writes "
            f"go to {self.spool.path} and the stage goes on",
            flush=True,
        )

    def _write(self, op: dict[str, Any], files: list[tuple[Path, str]] | None = None) -> None:
        files = files or []
        if self.spool is None:
            try:
                _apply(self.client, self.run_id, op, [source for source, _ in files])
                return
            except Exception as err:  # noqa: BLE001 - _defer re-raises what is not an outage
                self._defer(err)
        self.spool.append(op, files)

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._write({"op": "metrics", "metrics": metrics, "step": step, "timestamp": _now_ms()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        self._write({"op": "artifact", "artifact_path": artifact_path}, [(path, path.name)])

    def log_dict(self, value: dict[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(value, indent=2))
            self.log_artifact(path)

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        self._write({"op": "inputs", "datasets": datasets})

    def log_model(self, model: keras.Model, model_file: Path, input_example: np.ndarray) -> None:
        """The model as an MLflow model; spooled as the model file the stage wrote."""
        if self.spool is None:
            try:
                log_model(model, input_example, self.run_id)
                return
            except Exception as err:  # noqa: BLE001 - _defer re-raises what is not an outage
                self._defer(err)
        with tempfile.TemporaryDirectory() as tmp:
            example = Path(tmp) / "input_example.npy"
            np.save(example, input_example)
            files = [(Path(model_file), "model.keras"), (example, example.name)]
            self._write({"op": "model"}, files)

    def set_status(self, status: str) -> None:
        self._write({"op": "status", "status": status})

    def end(self, status: str) -> None:
        self._write({"op": "end", "status": status, "end_time": _now_ms()})

    def close(self) -> None:
        """Release the spool to `make sync`, and say in one line how far tracking is behind."""
        if self.spool is None:
            return
        self.spool.release()
        behind = spool.describe(self.spool.unsynced())
        why = f" ({self._why})" if self._why else ""
        print(
            f"tracking: {self.uri} is behind{why}: {behind} of run {self.spool.display_id} wait "
            f"in {self.spool.path}; `make sync` sends them once it answers (the next pipeline "
            "run does it first)",
            flush=True,
        )

    def where(self) -> str:
        """The run in the UI, or where its writes wait."""
        if self.deferred:
            return f"run {self.spool.display_id}, waiting in {self.spool.path} for `make sync`"
        return run_url(self.run_id)


def _owner_tags() -> dict[str, str]:
    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}


def fail_orphaned_runs() -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this host is gone (e.g. after `kill -9`)."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    client = mlflow.MlflowClient()
    orphaned = []
    host = socket.gethostname()
    # A run whose writes wait in the spool ends when they are synced: not an orphan.
    spooled = {s.run_id for s in spool.pending(project_root())}
    for run in client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"
    ):
        tags = run.data.tags
        pid = tags.get(TAG_PID, "")
        if run.info.run_id in spooled:
            continue
        if tags.get(TAG_HOST) == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            client.set_tag(
                run.info.run_id, "mnist_lstm.orphaned", f"process {pid} died while running"
            )
            client.set_terminated(run.info.run_id, status="FAILED")
            orphaned.append(run.info.run_id)
    return orphaned


@contextlib.contextmanager
def _ending(run: RunWriter) -> Iterator[RunWriter]:
    """The run ends FINISHED, FAILED on an error, or KILLED on SIGINT/SIGTERM."""
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        run.close()
        raise
    except BaseException:
        run.end("FAILED")
        run.close()
        raise
    run.end("FINISHED")
    run.close()


def _source_tags(stage: str) -> dict[str, str]:
    """What MLflow records about who started a run (user, source type), the source being the DVC
    stage (MLflow would record the absolute script path)."""
    tags = context_registry.resolve_tags({})
    tags.update({"mlflow.source.name": f"{stage} (dvc stage)", "mlflow.source.type": "LOCAL"})
    return tags


def _new_run(name: str, tags: dict[str, str], create: dict[str, Any] | None = None) -> RunWriter:
    """Create the run in the store, or (offline, or when the store just went down) in a spool
    that creates it when it syncs. `create` adds how a sync finds an existing run instead."""
    tags = {**tags, **_owner_tags()}
    spec = {"run_name": name, "start_time": _now_ms(), "tags": tags, **(create or {})}
    why = "MNIST_LSTM_TRACKING=offline"
    if not offline():
        client = mlflow.MlflowClient(tracking_uri())
        try:
            experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
            run = client.create_run(
                experiment_id, start_time=spec["start_time"], tags=tags, run_name=name
            )
            return RunWriter(run.info.run_id)
        except Exception as err:
            if not _is_outage(err):
                raise
            why = _first_line(err)
    deferred = spool.Spool.create(project_root(), tracking_uri(), None, spec)
    return RunWriter(deferred.spool_id, deferred, why)


def _sync_first() -> None:
    """Before a stage logs anything: replay what earlier stages left in the spool for this store."""
    spools = spool.pending(project_root(), tracking_uri())
    if spools:
        sync(spools, say=lambda line: print(f"tracking: {line}", flush=True))


@contextlib.contextmanager
def training_run(
    run_name: str, params: dict[str, Any], facts: dict[str, str] | None = None
) -> Iterator[RunWriter]:
    """Open the pipeline's run, log params, the params snapshot and git lineage; yield its writer.

    `facts` are tags about how this run trained (devices, global batch): not params, because
    params.yaml does not set them and lineage compares the run's params with params.yaml."""
    if not offline():
        connect()
        _sync_first()
        for run_id in fail_orphaned_runs():
            print(f"tracking: run {run_id} was left RUNNING by a process that died; marked FAILED")
    tags = {**git_tags(project_root()), **dvc_experiment_tags(), **(facts or {})}
    params = {key: _portable(value) for key, value in params.items()}
    # The short commit tells apart runs of the same configuration made from different code.
    name = f"{run_name}@{tags['git.commit'][:7]}{'+dirty' if tags['git.dirty'] == 'true' else ''}"
    run = _new_run(name, {**_source_tags("train"), **tags})
    with _ending(run):
        run.log_params(params)
        run.log_dict(params, "params.json")
        yield run


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


def _spooled_run_for_model(model_md5: str) -> spool.Spool | None:
    """The newest spool for this store whose run trained a model file with this md5."""
    found = None
    for candidate in spool.pending(project_root(), tracking_uri()):
        for op in candidate.ops():
            if op["op"] == "tags" and op["tags"].get(TAG_MODEL_MD5) == model_md5:
                found = candidate
    return found


@contextlib.contextmanager
def evaluation_run(model_md5: str, fallback_name: str) -> Iterator[tuple[RunWriter, bool]]:
    """Reopen the newest run that trained this model file; a new run if none has (a new store).

    A training run still waiting in the spool is reopened there, and so is evaluation logged,
    even while the store is down: its run is open, if not yet sent. Yields (the run's writer,
    whether it is the training run).
    """
    store_down, down_error = "", None
    if not offline():
        try:
            connect()
        except TrackingError as err:
            store_down = err.reason
            down_error = err
    with spool.lock(project_root()):
        if not offline() and not store_down:
            _sync_first()
        pending = _spooled_run_for_model(model_md5)
        if pending is not None:
            pending.claim()
    if store_down and pending is None:
        raise down_error
    tags = {**git_tags(project_root()), **dvc_experiment_tags(), TAG_MODEL_MD5: model_md5}
    if pending is not None:
        run, is_training = RunWriter(pending.display_id, pending, store_down), True
    elif offline():
        # Which run trained this model is the store's to say: the sync looks it up.
        run, is_training = _new_run(fallback_name, tags, {"find_model_md5": model_md5}), False
    else:
        found = find_runs_by_model(model_md5)
        if found:
            run, is_training = RunWriter(found[0]), True
        else:
            run, is_training = _new_run(fallback_name, {**_source_tags("evaluate"), **tags}), False
    run.set_status("RUNNING")
    with _ending(run):
        yield run, is_training


def log_evaluation(
    run: RunWriter, metrics: dict[str, float], artifacts: list[Path], tags: dict[str, str]
) -> None:
    """Final metrics, report files and data lineage tags into the run.

    Metrics go under `eval/` (`eval/val_accuracy`): plain `val_accuracy` is training's per-epoch
    series, and a final point appended to it would read as an extra epoch.
    """
    run.log_metrics({f"{EVAL_PREFIX}{key}": value for key, value in metrics.items()})
    run.set_tags(tags)
    for path in artifacts:
        run.log_artifact(path, artifact_path="reports")


# --- Catching up: `make sync`, and every pipeline run before it logs. ---


def _create_spooled_run(client: mlflow.MlflowClient, deferred: spool.Spool) -> str:
    """The store's run for a spool that began without one: found again by its spool id when an
    earlier sync created it, the training run of its model (evaluate offline), or created."""
    spec = deferred.meta["create"]
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for filter_string in (
        f"tags.`{TAG_SPOOL_ID}` = '{deferred.spool_id}'",
        f"tags.`{TAG_MODEL_MD5}` = '{spec['find_model_md5']}'" if "find_model_md5" in spec else "",
    ):
        if not filter_string:
            continue
        runs = client.search_runs(
            [experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs:
            return runs[0].info.run_id
    run = client.create_run(
        experiment_id,
        start_time=spec["start_time"],
        tags={**spec["tags"], TAG_SPOOL_ID: deferred.spool_id},
        run_name=spec["run_name"],
    )
    return run.info.run_id


def _replay(deferred: spool.Spool, check: Callable[[], None]) -> tuple[str, int]:
    """Send a spool's unsynced ops in order, recording each as done; (run id, ops sent)."""
    client = mlflow.MlflowClient(deferred.tracking_uri)
    run_id = deferred.run_id
    if run_id is None:
        run_id = _create_spooled_run(client, deferred)
        deferred.mark_synced(run_id, 0)
    sent = 0
    for op in deferred.unsynced():
        check()
        _apply(client, run_id, op, deferred.files_of(op))
        deferred.mark_synced(run_id, op["seq"])
        sent += 1
    return run_id, sent


def sync(spools: list[spool.Spool] | None = None, say: Callable[[str], None] = print) -> bool:
    """Replay spools (all of this project's by default) into their stores, saying a line per run
    before and after; False when a store did not answer (its spools stay as they are).

    Idempotent and resumable: each op is recorded as sent once the store has it, and an op sent
    twice (a sync killed between the two) changes nothing. SIGINT/SIGTERM stop it between two ops
    (KeyboardInterrupt).
    """
    root = project_root()
    complete = True
    with spool.lock(root), interrupts_held() as check:
        for deferred in spools if spools is not None else spool.pending(root):
            if not deferred.path.is_dir():
                continue  # removed by a sync that held the lock before us
            todo = deferred.unsynced()
            uri = deferred.tracking_uri
            if todo:
                say(f"run {deferred.display_id}: sending {spool.describe(todo)} to {uri}")
            try:
                connect(uri=uri, attempts=1)
                run_id, _ = _replay(deferred, check)
            except (TrackingError, MlflowException, OSError) as err:
                complete = False
                if isinstance(err, TrackingError) or _is_outage(err):
                    reason = err.reason if isinstance(err, TrackingError) else _first_line(err)
                    say(
                        f"run {deferred.display_id}: not synced, {uri} does not answer "
                        f"({reason}); `make sync` again once it does"
                    )
                else:  # e.g. the run was deleted there: nothing to retry, nothing to throw away
                    say(
                        f"run {deferred.display_id}: {uri} refused a write ({_first_line(err)}); "
                        f"the rest stays in {deferred.path}"
                    )
                continue
            if deferred.finished():
                deferred.remove()
                say(f"run {run_id}: in sync with {uri}")
            else:
                say(f"run {run_id}: sent what there was; its stage is still writing")
    return complete


def waiting() -> list[str]:
    """A line per run with writes waiting in this project's spool (for `make lineage`)."""
    return [
        f"run {s.display_id}: {spool.describe(s.unsynced())} wait for {s.tracking_uri}"
        + (" (its stage is still writing)" if s.writer_alive() else " (`make sync`)")
        for s in spool.pending(project_root())
    ]


# MLflow 3.17's UI opens an experiment on its GenAI overview, whatever its experiment kind tag,
# unless the link asks for the model-training view (`make ui-check` watches that this is still so).
TRAINING_VIEW = "workflowType=machine_learning"


def run_url(run_id: str) -> str:
    """Where the run is in the UI that `make ui` starts (or the tracking server's own UI)."""
    experiment_id = mlflow.MlflowClient(tracking_uri()).get_run(run_id).info.experiment_id
    uri = tracking_uri()
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


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
