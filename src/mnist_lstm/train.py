"""Stage `train`: fit the LSTM on the processed training split, validating every epoch.

Reads params `fetch`, `normalize` and `train` (all logged to the run) and the processed `.npz`;
writes the Keras model file and a per-epoch history CSV. dvc.yaml: `python -m mnist_lstm.train
--params params.yaml --data data/processed/mnist.npz --model models/model.keras
--history models/history.csv`.

Opens the pipeline's MLflow run before training (so a bad store fails in seconds, not after ten
epochs) and tags it with the model file's sha256, which `evaluate` uses to find it again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from mnist_lstm import contracts, tracking
from mnist_lstm.errors import exits_cleanly
from mnist_lstm.model import build_model
from mnist_lstm.params import TrainParams, flatten, load_params

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def set_seed(seed: int) -> None:
    """The one place randomness is seeded: Python, NumPy and the backend."""
    keras.utils.set_random_seed(seed)


def run_name(params: TrainParams) -> str:
    """A name a person can tell apart in the UI: architecture, optimizer, schedule, experiment."""
    name = (
        f"lstm{params.units}{'-bn' if params.batch_norm else ''}-{params.optimizer}"
        f"-lr{params.learning_rate:g}-bs{params.batch_size}-e{params.epochs}"
    )
    experiment = tracking.dvc_experiment_tags().get("dvc.dvc_exp_name")
    return f"{experiment}:{name}" if experiment else name


def fit(
    model: keras.Model,
    data: dict[str, np.ndarray],
    params: TrainParams,
    callbacks: list[keras.callbacks.Callback],
    verbose: int | str = "auto",
) -> pd.DataFrame:
    """Train as the tutorial does; the per-epoch history as a table."""
    history = model.fit(
        data["x_train"],
        data["y_train"],
        validation_data=(data["x_val"], data["y_val"]),
        batch_size=params.batch_size,
        epochs=params.epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    return table[list(HISTORY_COLUMNS)]


def save_history(path: Path, history: pd.DataFrame) -> None:
    with contracts.atomic_path(path) as tmp:
        history.to_csv(tmp, index=False, float_format="%.6f")


def save_model(path: Path, model: keras.Model) -> str:
    """Write the model atomically; its sha256, which ties the file to its MLflow run."""
    with contracts.atomic_path(path) as tmp:
        model.save(tmp)
    return contracts.sha256_file(path)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    args = parser.parse_args(argv)

    fetch_params, normalize_params, params = load_params(
        args.params, "fetch", "normalize", "train"
    )
    data = contracts.load_processed(args.data)
    set_seed(params.seed)
    model = build_model(params)
    model.summary()

    with tracking.training_run(
        run_name(params), flatten(fetch_params, normalize_params, params), tags={}
    ) as run_id:
        started = time.perf_counter()
        # One line per epoch when DVC captures the output; the live bar on a terminal.
        verbose = "auto" if sys.stdout.isatty() else 2
        history = fit(model, data, params, [tracking.EpochMetrics()], verbose=verbose)
        seconds = time.perf_counter() - started
        model_sha = save_model(args.model, model)
        save_history(args.history, history)
        tracking.log_training(
            model, data["x_val"][:2], model_sha, train_seconds=seconds, epochs=len(history)
        )
    print(
        f"train: {len(history)} epochs in {seconds:.1f}s ({seconds / len(history):.2f}s/epoch), "
        f"val_accuracy {history['val_accuracy'].iloc[-1]:.4f}; model -> {args.model}; "
        f"MLflow run {run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
