"""Keras' per-epoch logs into the run: the one tracking piece that is a Keras callback, kept apart
so that looking a run or a model up (lineage, reproduce, promote) does not load TensorFlow."""

from __future__ import annotations

import time
from typing import Any

from mnist_lstm.runtime import keras
from mnist_lstm.tracking.outage import RunWriter


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
