"""Stage `train`: fit the LSTM on the processed training split, validating every epoch.

Reads params `train` (logged to the run, with the holdout size the processed `.npz` was cut with)
and the processed `.npz`; writes the Keras model file and a per-epoch history CSV. dvc.yaml:
`python -m mnist_lstm.train --params params.yaml --data data/processed/mnist.npz
--model models/model.keras --history models/history.csv`.

Opens the pipeline's MLflow run before training (so a bad store fails in seconds, not after ten
epochs) and tags it with the model file's md5 -- the hash dvc.lock records -- which `evaluate`
uses to find it again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing.pool
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_lstm import contracts, keras_multiworker, tracking
from mnist_lstm.devices import Cluster, cluster_from, split_cpu, strategy_for
from mnist_lstm.errors import UserError, exits_cleanly, interrupts_held
from mnist_lstm.input_pipeline import VALIDATION_BATCH_SIZE, training_batches, validation_batches
from mnist_lstm.keras_archive import save_model
from mnist_lstm.model import build_model
from mnist_lstm.onednn_lstm import choose_kernel
from mnist_lstm.params import ParamsError, TrainParams, flatten, load_params
from mnist_lstm.runtime import keras, limit_malloc_arenas, tf

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def set_seed(seed: int) -> None:
    """The one place randomness is seeded: Python, NumPy and the backend.

    Op determinism makes TensorFlow pick deterministic kernels (or refuse ops that have none), so
    the same seed, data and params give the same weights, not merely the same accuracy.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def run_name(params: TrainParams) -> str:
    """A name a person can tell apart in the UI: architecture, optimizer, schedule, experiment."""
    name = (
        f"lstm{params.units}{'-bn' if params.batch_norm else ''}-{params.optimizer}"
        f"-lr{params.learning_rate:g}-bs{params.batch_size}-e{params.epochs}"
    )
    experiment = tracking.dvc_experiment_tags().get("dvc.dvc_exp_name")
    return f"{experiment}:{name}" if experiment else name


def training_splits(
    data: dict[str, np.ndarray], tuning_split: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, per-epoch validation). With `tuning_split` N > 0 the last N training images
    validate instead of the validation split, so choosing hyperparameters never looks at it."""
    if not tuning_split:
        return (data["x_train"], data["y_train"]), (data["x_val"], data["y_val"])
    if tuning_split >= len(data["x_train"]):
        raise ParamsError(
            f"train.tuning_split must leave training images: got {tuning_split}, "
            f"but there are only {len(data['x_train'])}"
        )
    cut = len(data["x_train"]) - tuning_split
    return (
        (data["x_train"][:cut], data["y_train"][:cut]),
        (data["x_train"][cut:], data["y_train"][cut:]),
    )


def upstream_params(data: dict[str, np.ndarray]) -> dict[str, int]:
    """The upstream params the processed data itself records, logged with train's own. Read
    from the file, not from params.yaml: a stage that depended on `fetch`/`normalize` params only
    to log them would retrain whenever one changed, even one that changes no byte of the data
    (a download timeout)."""
    return {"normalize.holdout_size": len(data["y_holdout"])}


def training_datasets(
    path: Path, md5: str, data: dict[str, np.ndarray], tuning_split: int
) -> list[dict]:
    """The splits fit trains and validates on, as MLflow datasets of the DVC-tracked file."""
    (x_fit, y_fit), (x_check, y_check) = training_splits(data, tuning_split)
    names = (
        (f"mnist-train[:-{tuning_split}]", f"mnist-train[-{tuning_split}:]")
        if tuning_split
        else ("mnist-train", "mnist-validation")
    )
    return [
        tracking.dataset(names[0], path, md5, x_fit, y_fit, "training"),
        tracking.dataset(names[1], path, md5, x_check, y_check, "validation"),
    ]


class _StopOnInterrupt(keras.callbacks.Callback):
    """Raises a held SIGINT/SIGTERM between steps (see errors.interrupts_held)."""

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self._check = check

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._check()

    on_test_batch_end = on_epoch_begin = on_epoch_end = on_train_batch_end


def fit(
    model: keras.Model,
    data: dict[str, np.ndarray],
    params: TrainParams,
    callbacks: list[keras.callbacks.Callback],
    verbose: int | str = "auto",
    replicas: int = 1,
) -> pd.DataFrame:
    """Train as the tutorial does; the per-epoch history as a table. With several replicas each
    step takes `batch_size` images per replica, the dataset yields the global batch."""
    (x_train, y_train), (x_val, y_val) = training_splits(data, params.tuning_split)
    # Ctrl-C and SIGTERM stop training between steps, never inside TensorFlow's Python code.
    with interrupts_held() as check:
        history = model.fit(
            training_batches(x_train, y_train, params.batch_size * replicas, params.seed),
            # Validation only predicts: big batches make it cheap, and the batch size does not
            # change what it measures.
            validation_data=validation_batches(x_val, y_val, VALIDATION_BATCH_SIZE),
            # The dataset shuffles itself, seeded; Keras would only warn that it ignores
            # shuffle=True.
            shuffle=False,
            epochs=params.epochs,
            callbacks=[*callbacks, _StopOnInterrupt(check)],
            verbose=verbose,
        )
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    return table[list(HISTORY_COLUMNS)]


def tune_process() -> None:
    """Process settings that cost nothing in results and save time and memory."""
    limit_malloc_arenas()
    # TensorFlow, Keras and MLflow leave ~400,000 Python objects that live as long as the
    # process. Frozen, the garbage collector stops walking them in every full collection during
    # training and once more at exit (docs/performance.md).
    gc.freeze()


def build(
    params: TrainParams, data: dict[str, np.ndarray], cluster: Cluster | None = None
) -> tuple[keras.Model, dict[str, str]]:
    """The model on its devices and hosts (devices.py) with its LSTM kernel; tags that say
    which."""
    split_cpu(os.environ)
    (x_fit, _), _ = training_splits(data, params.tuning_split)  # refuses a bad split up front
    # Before any other TensorFlow work: a multi-host strategy starts this host's server.
    strategy = strategy_for(params, cluster)
    set_seed(params.seed)
    replicas = strategy.num_replicas_in_sync
    # The fused oneDNN op where it is built and usable, else Keras' own LSTM (cuDNN on a GPU).
    kernel, why = choose_kernel(params.lstm_kernel)
    print(f"train: LSTM kernel {kernel} ({why})", flush=True)
    # On a GPU the LSTM runs Keras' cuDNN kernel, which an unrolled graph would rule out.
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    with strategy.scope():
        model = build_model(
            params, n_train=len(x_fit), replicas=replicas, unroll=not on_gpu, kernel=kernel
        )
    # Keras' fit across hosts needs two mends (keras_multiworker.py); nothing changes elsewhere.
    keras_multiworker.prepare(model, strategy, params.batch_size)
    model.summary()
    facts = {
        "train.cluster_size": str(cluster.size if cluster else 1),
        "train.replicas": str(replicas),
        "train.global_batch_size": str(params.batch_size * replicas),
        tracking.TAG_LSTM_KERNEL: kernel,
    }
    return model, facts


@contextlib.contextmanager
def cluster_failures(cluster: Cluster | None) -> Iterator[None]:
    """A host of the cluster lost mid-training (killed, its link down): TensorFlow's collective
    or coordination error becomes one line. Its training steps cannot go on without it."""
    lost = None
    try:
        yield
    except tf.errors.OpError as err:
        if cluster is None or cluster.size < 2:
            raise
        lost = cluster.failure(err.message)
    if lost:
        # TensorFlow's eager all-reduce (reading the metrics at an epoch's end) closes its thread
        # pool only when the reduce succeeds; left open, the pool's finalizer fails at exit with
        # a traceback. tests/test_upstream.py fails when TensorFlow closes it itself.
        for pool in gc.get_objects():
            if isinstance(pool, multiprocessing.pool.Pool) and pool._state == "RUN":
                pool.terminate()
        raise UserError(lost)


def train_as_worker(
    model: keras.Model,
    data: dict[str, np.ndarray],
    params: TrainParams,
    replicas: int,
    cluster: Cluster,
) -> int:
    """A non-chief host: takes its part in every step, then leaves the model, the history and
    the run to the chief."""
    verbose = "auto" if sys.stdout.isatty() else 2
    with cluster_failures(cluster):
        history = fit(model, data, params, [], verbose=verbose, replicas=replicas)
    print(
        f"train: {cluster.describe()}, {len(history)} epochs done; the chief "
        f"({cluster.describe(0)}) writes the model and logs the run"
    )
    return 0


def save_history(path: Path, history: pd.DataFrame) -> None:
    with contracts.atomic_path(path) as tmp:
        history.to_csv(tmp, index=False, float_format="%.6f")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    args = parser.parse_args(argv)

    (params,) = load_params(args.params, "train")
    tune_process()
    # 1. Load MNIST, scaled to [0, 1] by `normalize` (held as uint8 levels: ~160 MiB less memory).
    data = contracts.load_processed(args.data, levels=True)
    # 2. Build the tutorial's model: LSTM(64) -> BatchNormalization -> Dense(10) logits, SGD.
    cluster = cluster_from(os.environ)
    model, facts = build(params, data, cluster)
    replicas = int(facts["train.replicas"])
    if cluster is not None and not cluster.is_chief:
        return train_as_worker(model, data, params, replicas, cluster)
    # 3. Fit, logging every epoch. The run opens first: a store that is down fails before epoch 1.
    processed_md5 = contracts.md5_file(args.data)
    with tracking.training_run(
        run_name(params), {**flatten(params), **upstream_params(data)}, facts
    ) as run:
        run.log_datasets(training_datasets(args.data, processed_md5, data, params.tuning_split))
        started = time.perf_counter()
        # One line per epoch when DVC captures the output; the live bar on a terminal.
        verbose = "auto" if sys.stdout.isatty() else 2
        with cluster_failures(cluster):
            history = fit(
                model,
                data,
                params,
                [tracking.EpochMetrics(run)],
                verbose=verbose,
                replicas=replicas,
            )
        seconds = time.perf_counter() - started
        # 4. Save the model file DVC tracks (identical training, identical bytes) and the history.
        model_md5 = save_model(args.model, model)
        save_history(args.history, history)
        # 5. Log the model, and the hashes that tie the run to dvc.lock.
        # Across hosts the trained model lives in the cluster's strategy, where every predict
        # (MLflow infers the signature with one) is a step the other hosts have left: log the
        # saved file instead.
        if cluster is not None:
            model = keras.models.load_model(args.model, safe_mode=True)
        tracking.log_training(
            run,
            model,
            args.model,
            contracts.as_pixels(data["x_val"][:2]),
            lineage={tracking.TAG_PROCESSED_MD5: processed_md5, tracking.TAG_MODEL_MD5: model_md5},
            train_seconds=seconds,
            epochs=len(history),
        )
    print(
        f"train: {len(history)} epochs on {replicas} device(s)"
        f"{f' across {cluster.size} hosts' if cluster else ''} in {seconds:.1f}s "
        f"({seconds / len(history):.2f}s/epoch), "
        f"val_accuracy {history['val_accuracy'].iloc[-1]:.4f}; model -> {args.model}; "
        f"MLflow run {run.run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
