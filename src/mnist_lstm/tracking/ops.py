"""What each tracking op does to the store: the one place a write is performed, live by
outage.RunWriter and replayed from the spool by outage.sync, so a run synced after an outage holds
what it would have held without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mnist_lstm.tracking.models import MODEL_NAME, log_model


def _dataset_entity(spec: dict[str, Any]) -> Dataset:
    return Dataset(
        name=spec["name"],
        digest=spec["digest"],
        source_type=spec["source_type"],
        source=spec["source"],
        schema=spec["schema"],
        profile=spec["profile"],
    )


def apply_op(
    client: mlflow.MlflowClient, run_id: str, op: dict[str, Any], files: list[Path]
) -> None:
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
    from mnist_lstm.runtime import keras  # only a sync that logs a model loads TensorFlow

    model = keras.models.load_model(model_file, safe_mode=True)
    log_model(model, model_file, np.load(example_file), run_id)
