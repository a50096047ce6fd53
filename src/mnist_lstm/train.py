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
import gc
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_lstm import contracts, tracking
from mnist_lstm.errors import UserError, exits_cleanly, interrupts_held
from mnist_lstm.model import build_model
from mnist_lstm.onednn_lstm import choose_kernel
from mnist_lstm.params import ParamsError, TrainParams, flatten, load_params
from mnist_lstm.runtime import keras, limit_malloc_arenas, tf

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
# Splits the CPU into N logical devices: multi-device training, testable without a second device.
CPU_DEVICES_ENV = "MNIST_LSTM_CPU_DEVICES"
VALIDATION_BATCH_SIZE = 1024
# Training steps whose images one Python call gathers: a call per step cost ~0.1 s of CPU per epoch
# on this 2-core machine, taken from the training threads.
GATHER_GROUP = 32


def set_seed(seed: int) -> None:
    """The one place randomness is seeded: Python, NumPy and the backend.

    Op determinism makes TensorFlow pick deterministic kernels (or refuse ops that have none), so
    the same seed, data and params give the same weights, not merely the same accuracy.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def split_cpu(env: Mapping[str, str]) -> None:
    """Honour MNIST_LSTM_CPU_DEVICES=N before TensorFlow touches a device."""
    value = env.get(CPU_DEVICES_ENV)
    if value is None:
        return
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{CPU_DEVICES_ENV} must be a whole number >= 1, got {value!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(int(value))]
    )


def strategy_for(params: TrainParams) -> tf.distribute.Strategy:
    """With `distribute: auto` and more than one device visible (GPUs, else logical CPUs), a
    MirroredStrategy: a model replica per device, gradients all-reduced every step. Otherwise
    TensorFlow's default, one device."""
    devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
        d.name for d in tf.config.list_logical_devices("CPU")
    ]
    if params.distribute == "off" or len(devices) < 2:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices)


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


def training_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Every image once per epoch, in a fresh seeded order, cut into batches of exactly
    `batch_size`: the last batch is topped up with the epoch's first images.

    Fixed-size batches let TensorFlow specialise the training graph to one static shape instead
    of an unknown batch dimension -- about a quarter of each epoch on this CPU (README
    "Performance"). Topping up keeps the tutorial's step count (ceil(n / batch)) and trains on every
    image each epoch, unlike dropping the remainder.
    """
    n = len(x)
    steps = -(-n // batch_size)
    top_up = steps * batch_size - n

    def epoch_steps(order: tf.Tensor) -> tf.Tensor:
        return tf.reshape(tf.concat([order, order[:top_up]], axis=0), (steps, batch_size))

    return (
        tf.data.Dataset.range(n)
        # Reshuffled every epoch from one seed: a rerun sees the same orders.
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .batch(n)
        .map(epoch_steps)
        .unbatch()
        # Rows for GATHER_GROUP steps at a time, then split into the steps again.
        .batch(GATHER_GROUP)
        .map(_gather_from(x, y, (None, batch_size)))
        .unbatch()
        .prefetch(2)
        # `unbatch` hides the length; Keras needs it for its progress and step count.
        .apply(tf.data.experimental.assert_cardinality(steps))
        .with_options(_without_autotune())
    )


def validation_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """The images in order, `batch_size` at a time (the last batch may be smaller)."""
    n = len(x)

    def rows(start: tf.Tensor) -> tf.Tensor:
        return tf.range(start, tf.minimum(start + batch_size, n))

    return (
        tf.data.Dataset.range(0, n, batch_size)
        .map(rows)
        .map(_gather_from(x, y, (None,)))
        .prefetch(1)
        .with_options(_without_autotune())
    )


def _gather_from(
    x: np.ndarray, y: np.ndarray, index_shape: tuple[int | None, ...]
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """A tf.data map from an array of row indices to (float32 pixels, labels) of that shape,
    gathered from the NumPy arrays themselves.

    A TensorFlow copy of the images (`tf.constant`, or what Keras makes of arrays) raised the
    stage's peak memory by 190-280 MiB; images held as uint8 levels (`load_processed`) cost a
    quarter of float32, and `as_pixels` gives the exact float32 values `normalize` wrote. Each call
    is a Python callback (~0.2 ms), hence GATHER_GROUP steps per call (README "Performance").
    """

    def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return contracts.as_pixels(x[index]), y[index]

    def batch(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(
            gather, [index], (tf.float32, tf.as_dtype(y.dtype)), stateful=False
        )
        images.set_shape((*index_shape, *x.shape[1:]))
        labels.set_shape(index_shape)
        return images, labels

    return batch


def _without_autotune() -> tf.data.Options:
    # tf.data's autotuner wakes up in the background to re-tune buffers and threads; on two cores it
    # preempts the training threads and made every other epoch ~70% slower (README "Performance").
    # Gathering a batch of 64 rows needs no tuning.
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


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


def save_history(path: Path, history: pd.DataFrame) -> None:
    with contracts.atomic_path(path) as tmp:
        history.to_csv(tmp, index=False, float_format="%.6f")


# A `.keras` file is a zip. Keras stamps the save time into `metadata.json` and into the zip entry
# of the weights, and numbers shared objects in `config.json` by their Python id() (a memory
# address). Pinning all three makes identical training give an identical file (and DVC hash).
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FIXED_SAVE_DATE = "1980-01-01@00:00:00"


def _renumber_shared_objects(config: object, ids: dict[int, int]) -> object:
    """Replace id()-based `shared_object_id`s by 1, 2, ... in order of first appearance."""
    if isinstance(config, dict):
        return {
            key: ids.setdefault(value, len(ids) + 1)
            if key == "shared_object_id"
            else _renumber_shared_objects(value, ids)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_renumber_shared_objects(item, ids) for item in config]
    return config


def stabilize_keras_archive(src: Path, dst: Path) -> None:
    """Copy a `.keras` archive with its run-varying bytes (save time, zip times) pinned."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            payload = zin.read(info.filename)
            if info.filename == "metadata.json":
                metadata = json.loads(payload)
                metadata["date_saved"] = _FIXED_SAVE_DATE
                payload = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                payload = json.dumps(_renumber_shared_objects(json.loads(payload), {})).encode()
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME), payload)


def save_model(path: Path, model: keras.Model) -> str:
    """Write the model atomically and byte-reproducibly; its md5, as dvc.lock will record it."""
    with contracts.scratch_path(path) as raw, contracts.atomic_path(path) as final:
        model.save(raw)
        stabilize_keras_archive(raw, final)
    return contracts.md5_file(path)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    args = parser.parse_args(argv)

    (params,) = load_params(args.params, "train")
    limit_malloc_arenas()
    # TensorFlow, Keras and MLflow leave ~400,000 Python objects that live as long as the
    # process. Frozen, the garbage collector stops walking them in every full collection during
    # training and once more at exit (README "Performance").
    gc.freeze()
    # Images as uint8 levels, converted to the same float32 batch by batch: ~160 MiB less memory.
    data = contracts.load_processed(args.data, levels=True)
    split_cpu(os.environ)
    set_seed(params.seed)
    (x_fit, _), _ = training_splits(data, params.tuning_split)  # refuses a bad split up front
    strategy = strategy_for(params)
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
    model.summary()
    facts = {
        "train.replicas": str(replicas),
        "train.global_batch_size": str(params.batch_size * replicas),
        tracking.TAG_LSTM_KERNEL: kernel,
    }
    processed_md5 = contracts.md5_file(args.data)
    with tracking.training_run(
        run_name(params), {**flatten(params), **upstream_params(data)}, facts
    ) as run:
        run.log_datasets(training_datasets(args.data, processed_md5, data, params.tuning_split))
        started = time.perf_counter()
        # One line per epoch when DVC captures the output; the live bar on a terminal.
        verbose = "auto" if sys.stdout.isatty() else 2
        history = fit(
            model, data, params, [tracking.EpochMetrics(run)], verbose=verbose, replicas=replicas
        )
        seconds = time.perf_counter() - started
        model_md5 = save_model(args.model, model)
        save_history(args.history, history)
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
        f"train: {len(history)} epochs on {replicas} device(s) in {seconds:.1f}s "
        f"({seconds / len(history):.2f}s/epoch), "
        f"val_accuracy {history['val_accuracy'].iloc[-1]:.4f}; model -> {args.model}; "
        f"MLflow run {run.run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
