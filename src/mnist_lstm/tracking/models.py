"""The trained Keras model as an MLflow model: logged with a signature, an input example and
pinned requirements, holding the very file DVC tracks; downloaded, checked and loaded back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.models.model import MLMODEL_FILE_NAME

from mnist_lstm.contracts import md5_file
from mnist_lstm.errors import UserError, one_line
from mnist_lstm.tracking.store import TrackingError, tracking_uri

if TYPE_CHECKING:  # TensorFlow loads only where a model is logged or loaded (not for a lookup)
    from mnist_lstm.runtime import keras

MODEL_NAME = "model"
# Where mlflow.keras keeps the Keras archive inside a logged model (its flavor's `data` folder,
# `model` + `.keras`): the only file of the model that holds weights.
KERAS_FILE = Path("data") / "model.keras"
# What the MLmodel of a model logged here says about loading it: through mlflow.keras, from
# KERAS_FILE, with no code of its own (pyfunc imports `loader_module` and puts `code` on sys.path).
_PYFUNC_KEYS = {"loader_module", "python_version", "env"}


class UnverifiedModel(UserError):
    """A logged model whose files are not what was verified or recorded: never loaded."""


class _KerasFlavor:
    """`mlflow.keras` with its save folder created first, holding the given Keras file.

    In mlflow 3.17 `mlflow.keras.save_model` writes the input example before it creates the model
    folder, so `log_model(input_example=...)` fails; creating the folder first is all it lacks.
    Its own save of the model stamps the time into the archive; the file the stage wrote (the
    bytes dvc.lock records) replaces it, so `make promote` can hash the logged model against
    dvc.lock.
    """

    @staticmethod
    def save_model(path: str, keras_file: Path, mlflow_model: Model, **kwargs: Any) -> None:
        kwargs.pop("validate_serving_input", None)  # Model.log's own option, not the flavor's
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        target = Path(path) / KERAS_FILE
        saved_size = target.stat().st_size
        shutil.copyfile(keras_file, target)
        if mlflow_model.model_size_bytes:
            mlflow_model.model_size_bytes += target.stat().st_size - saved_size
            mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _requirements() -> list[str]:
    """Pinned from this environment instead of inferred (inference reloads the model in a
    subprocess); the pins are what the model was trained and tested with. Named by the
    platform-neutral distributions, whatever this machine installed: `tensorflow` ships for Linux,
    macOS and Windows (CPU and GPU), `tensorflow-cpu` for two of them. NumPy is left to
    TensorFlow's own bounds: its newest release differs by Python version."""
    from mnist_lstm.runtime import keras, tf

    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]


def log_model(model: keras.Model, keras_file: Path, input_example: np.ndarray, run_id: str) -> str:
    """Log the model (mlflow.keras flavor, `keras_file` as its archive: the model saved) with a
    signature and an input example; its URI."""
    from mnist_lstm.runtime import keras

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
            keras_file=Path(keras_file),
            signature=signature,
            input_example=input_example,
            pip_requirements=_requirements(),
            run_id=run_id,
            # MLflow would load the saved model once more and predict the example again (0.9 s
            # of every train stage): the signature above came from predicting it already, and
            # what is logged is the file the stage saved, checked by md5 wherever it is loaded.
            validate_serving_input=False,
        )
    finally:
        keras.utils.enable_interactive_logging()
    return info.model_uri


def download_model(uri: str, dst: Path) -> Path:
    """A private copy of the MLflow model `uri` names, in `dst` (never the store's own folder,
    which `download_artifacts` would hand back for a local store)."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as err:
        raise TrackingError(
            f"{uri}: cannot download from {tracking_uri()} ({one_line(err.message)})"
        ) from None
    except OSError as err:
        raise TrackingError(
            f"{uri}: cannot download from {tracking_uri()} ({one_line(err)})"
        ) from None


def keras_file_md5(folder: Path, name: str) -> str:
    """The md5 of the Keras archive in a downloaded model folder, once its MLmodel is checked to
    load exactly that archive through mlflow.keras and no code of its own (the artifact store
    can be written by others: a changed MLmodel could make pyfunc import any module)."""
    try:
        flavors = Model.load(str(folder / MLMODEL_FILE_NAME)).flavors
    except Exception as err:  # noqa: BLE001 - whatever the file holds, the model is refused
        raise UnverifiedModel(f"{name}: no readable MLmodel ({one_line(err)})") from None
    pyfunc, flavor = flavors.get("python_function", {}), flavors.get("keras", {})
    loads_keras_only = (
        set(flavors) == {"python_function", "keras"}
        and pyfunc.get("loader_module") == "mlflow.keras"
        and set(pyfunc) <= _PYFUNC_KEYS
        and flavor.get("data") == str(KERAS_FILE.parent)
        and flavor.get("save_exported_model") is False
    )
    if not loads_keras_only:
        raise UnverifiedModel(
            f"{name}: its MLmodel does not load {KERAS_FILE.as_posix()} through mlflow.keras "
            "alone (flavors or loader changed); refusing to load it"
        )
    if not (folder / KERAS_FILE).is_file():
        raise UnverifiedModel(f"{name}: holds no {KERAS_FILE.as_posix()}; refusing to load it")
    return md5_file(folder / KERAS_FILE)


def load_keras_file(folder: Path, name: str) -> keras.Model:
    """The Keras model of a downloaded, checked model folder (Keras' safe mode: no lambdas)."""
    from mnist_lstm.runtime import keras

    try:
        return keras.saving.load_model(folder / KERAS_FILE, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - Keras raises many types for a damaged archive
        raise UnverifiedModel(f"{name}: not a loadable Keras model ({one_line(err)})") from None
