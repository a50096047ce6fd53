"""The trained Keras model as an MLflow model: logged with a signature, an input example and
pinned requirements, and loaded back from any MLflow model URI."""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from mnist_lstm.errors import one_line
from mnist_lstm.runtime import keras, tf
from mnist_lstm.tracking.store import TrackingError, tracking_uri

MODEL_NAME = "model"


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


def load_model(uri: str) -> keras.Model:
    """A Keras model from an MLflow URI (`models:/mnist-lstm@champion`, `runs:/…`, `models:/m-…`),
    read from the configured tracking server or the repo's store."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.keras.load_model(uri)
    except MlflowException as err:
        raise TrackingError(f"{uri}: cannot load from {tracking_uri()} ({err.message})") from None
    except OSError as err:
        raise TrackingError(f"{uri}: cannot load from {tracking_uri()} ({one_line(err)})") from None
