"""What a pipeline run holds in MLflow, and how the stages hand it over; the only package that
imports mlflow.

One run covers one pipeline execution: `train` opens it, logs params, per-epoch metrics and the
model, and tags it with the md5 of the model file it wrote -- the hash dvc.lock records for it.
`evaluate` hashes the model file it is given and logs into the newest run carrying that tag, so the
hand-over holds even when DVC restores train's outputs from its cache instead of running it, no run
id ever lands in a DVC output, and the hash in dvc.lock finds the run(s) that made those bytes.

Beside this module: where runs live (store.py), the model's MLflow format (models.py), writes that
survive an outage (outage.py over spool.py), the registry and lineage queries (registry.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

# store.py first: it sets MLflow's environment before mlflow is imported.
from mnist_lstm.tracking.store import (
    EVAL_PREFIX,
    EXPERIMENT,
    TAG_LSTM_KERNEL,
    TAG_MODEL_MD5,
    TAG_PROCESSED_MD5,
    TAG_RAW_MD5,
    TRACKING_MODE_ENV,
    TrackingError,
    connect,
    offline,
    project_root,
    refusals,
    tracking_uri,
)

# isort: split
import mlflow
import numpy as np
import psutil
import yaml
from mlflow.models import infer_signature
from mlflow.tracking.context import registry as context_registry

from mnist_lstm.contracts import md5_file
from mnist_lstm.tracking import outage
from mnist_lstm.tracking.outage import TAG_HOST, TAG_PID, RunWriter

if TYPE_CHECKING:  # TensorFlow loads where a model is trained or logged, not for a lookup
    from mnist_lstm.runtime import keras

__all__ = [
    "ENVIRONMENT_TAGS",
    "EVAL_PREFIX",
    "EXPERIMENT",
    "REPRODUCTION_FILE",
    "TAG_LSTM_KERNEL",
    "TAG_MODEL_MD5",
    "TAG_PROCESSED_MD5",
    "TAG_RAW_MD5",
    "TRACKING_MODE_ENV",
    "RunWriter",
    "TrackingError",
    "connect",
    "dataset",
    "dvc_experiment_tags",
    "evaluation_run",
    "find_runs_by_model",
    "log_evaluation",
    "log_training",
    "offline",
    "project_root",
    "refusals",
    "tracking_uri",
    "training_run",
]


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


# The artifact that records what rebuilding the run's model needs beyond its params and commit
# (`make reproduce` reads it): the environment, and the md5 of every file the train stage
# depends on, as dvc.lock records them.
REPRODUCTION_FILE = "reproduction.json"
# Tags naming what can make the same code, params and data give other bytes.
ENVIRONMENT_TAGS = (
    "env.python",
    "env.tensorflow",
    "env.keras",
    "env.numpy",
    "env.platform",
    "env.cpu",
)


def cpu_model() -> str:
    """The CPU's model name (kernels and floating-point paths differ between CPUs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_tags() -> dict[str, str]:
    """What the model was built with, beyond the code and params: each can change its bytes."""
    from mnist_lstm.runtime import keras, tf

    values = (
        platform.python_version(),
        tf.__version__,
        keras.__version__,
        np.__version__,
        f"{platform.system()}-{platform.machine()}",
        cpu_model(),
    )
    return dict(zip(ENVIRONMENT_TAGS, values, strict=True))


def train_dependencies(
    stages: Path = Path("dvc.yaml"), known: dict[Path, str] | None = None
) -> dict[str, str]:
    """{path: md5} of every file dvc.yaml lists as a train dependency, hashed as dvc.lock does
    (folders and missing paths left out: DVC's own lock has them). `known`: md5s the caller has
    already computed (the processed data, 220 MB), not read again."""
    if not stages.is_file():
        return {}
    deps = (yaml.safe_load(stages.read_text()) or {}).get("stages", {}).get("train", {})
    known = {path.resolve(): md5 for path, md5 in (known or {}).items()}
    found = {}
    for dep in deps.get("deps", []):
        path = stages.parent / dep
        if path.is_file():
            found[dep] = known.get(path.resolve()) or md5_file(path)
    return found


def dvc_experiment_tags() -> dict[str, str]:
    names = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
    return {f"dvc.{name.lower()}": os.environ[name] for name in names if os.environ.get(name)}


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


def fail_orphaned_runs() -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this host is gone (e.g. after `kill -9`).

    A run is RUNNING only while the process its owner tags name writes to it: train's, or
    evaluate's once it reopens the run (evaluation_run re-tags it first)."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    client = mlflow.MlflowClient()
    orphaned = []
    host = socket.gethostname()
    # A run whose writes wait in the spool ends when they are synced: not an orphan.
    spooled = outage.spooled_run_ids()
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


def _close_orphans() -> None:
    """Runs a `kill -9` left RUNNING end FAILED, in one line each. Called by train and evaluate
    alike: whichever runs first in the next pipeline closes them, also when DVC restores train
    from its run-cache instead of running it."""
    for run_id in fail_orphaned_runs():
        print(f"tracking: run {run_id} was left RUNNING by a process that died; marked FAILED")


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


@contextlib.contextmanager
def training_run(
    run_name: str,
    params: dict[str, Any],
    facts: dict[str, Any] | None = None,
    hashed: dict[Path, str] | None = None,
) -> Iterator[RunWriter]:
    """Open the pipeline's run, log params, the params snapshot and git lineage; yield its writer.

    `facts` are tags about how this run trained (devices, global batch): not params, because
    params.yaml does not set them and lineage compares the run's params with params.yaml.
    `hashed`: the md5 of files the stage has hashed already (its data), for reproduction.json."""
    if not offline():
        connect()
        outage.sync_first()
        _close_orphans()
    environment = environment_tags()
    tags = {
        **git_tags(project_root()),
        **dvc_experiment_tags(),
        **environment,
        **(facts or {}),
    }
    params = {key: _portable(value) for key, value in params.items()}
    # The short commit tells apart runs of the same configuration made from different code.
    name = f"{run_name}@{tags['git.commit'][:7]}{'+dirty' if tags['git.dirty'] == 'true' else ''}"
    run = outage.new_run(name, {**_source_tags("train"), **tags})
    with _ending(run):
        run.log_params(params)
        run.log_dict(params, "params.json")
        run.log_dict(
            {
                "environment": environment,
                "facts": {key: str(value) for key, value in (facts or {}).items()},
                "train_dependencies": train_dependencies(known=hashed),
            },
            REPRODUCTION_FILE,
        )
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
    pending = outage.claim_spooled_run(model_md5, store_down)
    if store_down and pending is None:
        raise down_error
    if not offline() and not store_down:
        _close_orphans()
    tags = {**git_tags(project_root()), **dvc_experiment_tags(), TAG_MODEL_MD5: model_md5}
    if pending is not None:
        run, is_training = pending, True
    elif offline():
        # Which run trained this model is the store's to say: the sync looks it up.
        run = outage.new_run(fallback_name, tags, {"find_model_md5": model_md5})
        is_training = False
    else:
        found = find_runs_by_model(model_md5)
        if found:
            run, is_training = RunWriter(found[0]), True
            # Reopened by this process: owned by it while RUNNING, so another pipeline's
            # fail_orphaned_runs never takes it for an orphan of train's (long gone) process.
            run.set_tags(outage.owner_tags())
        else:
            run = outage.new_run(fallback_name, {**_source_tags("evaluate"), **tags})
            is_training = False
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
