"""The Model Registry and the queries behind `make promote` and `make lineage`: the champion, a
model's source run from any reference, what a run recorded. Every registry call of the project
lives here."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from mnist_lstm.errors import one_line
from mnist_lstm.tracking.store import EVAL_PREFIX, TrackingError, connect, tracking_uri

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
        raise TrackingError(
            f"{tracking_uri()}: cannot read the registry ({one_line(err)})"
        ) from None
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
        raise TrackingError(f"{ref}: not found in {tracking_uri()} ({one_line(err)})") from None


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
