"""The Model Registry and the queries behind `make promote`, `make serve` and `make lineage`: the
champion, a model's source run from any reference, what a run recorded, a run's logged model as
its bytes hash, a registered version checked against the hash recorded on it. Every registry call
of the project lives here.

Trust rests on bytes, not on tags anyone who can log a run can copy: promotion registers a logged
model only when the md5 of its Keras file, downloaded from the artifact store, is the one dvc.lock
records, and records that md5 on the version (TAG_VERSION_MD5); loading a registered version
downloads it first and refuses it unless its Keras file still has that md5.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version

from mnist_lstm.errors import one_line
from mnist_lstm.tracking.models import MODEL_NAME, UnverifiedModel, download_model, keras_file_md5
from mnist_lstm.tracking.store import EVAL_PREFIX, TrackingError, connect, tracking_uri

REGISTERED_MODEL = "mnist-lstm"
CHAMPION = "champion"
# On a registered version: the md5 of its Keras file, downloaded and hashed when it was registered.
TAG_VERSION_MD5 = "model_md5"


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


@dataclasses.dataclass(frozen=True)
class HashedModel:
    """One logged model of a run, as its bytes: the md5 of its Keras file in the artifact store
    (None, with `problem` saying why, when it cannot be downloaded or checked)."""

    model_id: str
    md5: str | None
    problem: str = ""


def logged_models(run_id: str, scratch: Path) -> list[HashedModel]:
    """The run's finished logged models, each downloaded into `scratch` and hashed."""
    run = mlflow.MlflowClient().get_run(run_id)
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        output_format="list",
    )
    hashed = []
    for model in found:
        if model.status != LoggedModelStatus.READY:
            continue
        uri = f"models:/{model.model_id}"
        try:
            folder = download_model(uri, scratch / model.model_id)
            hashed.append(HashedModel(model.model_id, keras_file_md5(folder, uri)))
        except (TrackingError, UnverifiedModel) as err:
            hashed.append(HashedModel(model.model_id, None, str(err)))
    return hashed


def promote(run_id: str, model_id: str, model_md5: str, previous_version: str | None) -> str:
    """Register a logged model whose bytes were verified (`model_md5`, recorded on the version) as
    a new version, move `champion` to it; the new version."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    version = mlflow.register_model(
        f"models:/{model_id}",
        REGISTERED_MODEL,
        tags={
            "git.commit": run.data.tags.get("git.commit", "unknown"),
            "previous_champion_version": str(previous_version or "none"),
            "source_run_id": run_id,
            TAG_VERSION_MD5: model_md5,
        },
    )
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
    return str(version.version)


@dataclasses.dataclass(frozen=True)
class CheckedModel:
    """A private copy of a model whose Keras file was hashed, and what it was checked against."""

    folder: Path
    md5: str
    # The registered version whose recorded md5 the bytes matched; None: the URI names no
    # registered version (runs:/…, models:/<model id>), so there was no recorded md5.
    version: str | None
    label: str


def download_checked(uri: str, dst: Path) -> CheckedModel:
    """Download the model `uri` names into `dst` and check it there, before anything loads it: a
    registered version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, the alias resolved once,
    here) must still hold the bytes whose md5 was recorded when it was registered."""
    if not uri.startswith("models:/"):
        folder = download_model(uri, dst)
        return CheckedModel(folder, keras_file_md5(folder, uri), None, uri)
    connect()
    client = mlflow.MlflowClient()
    try:
        resolved = get_model_name_and_version(client, uri)
        if len(resolved) == 1:  # models:/<model id>: a logged model, not a registered version
            folder = download_model(uri, dst)
            return CheckedModel(folder, keras_file_md5(folder, uri), None, uri)
        name, number = resolved
        version = client.get_model_version(name, number)
    except MlflowException as err:
        raise TrackingError(
            f"{uri}: not found in {tracking_uri()} ({one_line(err.message)})"
        ) from None
    # An alias, `latest` or a stage: the message names the version it resolved to.
    label = uri if uri.endswith(f"/{version.version}") else f"{uri} (version {version.version})"
    recorded = version.tags.get(TAG_VERSION_MD5)
    if not recorded:
        raise UnverifiedModel(
            f"{label}: registered without a recorded hash of its bytes (by an older mnist-lstm); "
            "`make promote` registers a version with one; refusing to load it"
        )
    # The exact version, not the alias again: the alias may move while this downloads.
    folder = download_model(f"models:/{name}/{version.version}", dst)
    md5 = keras_file_md5(folder, label)
    if md5 != recorded:
        raise UnverifiedModel(
            f"{label}: the model's bytes (md5 {md5}) differ from the md5 recorded when it was "
            f"registered ({recorded}); refusing to load it"
        )
    return CheckedModel(folder, md5, str(version.version), label)


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


def recorded_reproduction(run_id: str) -> dict[str, Any]:
    """What the run recorded for rebuilding its model (tracking.REPRODUCTION_FILE); {} for a run
    logged before it was recorded."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/reproduction.json")
    except (MlflowException, OSError, ValueError):
        return {}
