"""Stage `train`: fit the LSTM on the processed training split, validating every epoch.

Reads params `train` (logged to the run, with the holdout size the processed `.npz` was cut with)
and `system_metrics` (how often the run samples the machine: not a DVC dependency, it changes no
model) and the processed `.npz`; writes the Keras model file and a per-epoch history CSV. dvc.yaml:
`python -m mnist_lstm.train --params params.yaml --data data/processed/mnist.npz
--model models/model.keras --history models/history.csv`.

Opens the pipeline's MLflow run before training (so a bad store fails in seconds, not after ten
epochs) and tags it with the model file's md5 -- the hash dvc.lock records -- which `evaluate`
uses to find it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_lstm import contracts, devices, tracking
from mnist_lstm.devices import Placement
from mnist_lstm.errors import HeldInterrupts, exits_cleanly, interrupts_held
from mnist_lstm.input_pipeline import VALIDATION_BATCH_SIZE, training_batches, validation_batches
from mnist_lstm.keras_archive import save_model
from mnist_lstm.model import build_model, compile_model
from mnist_lstm.params import (
    ParamsError,
    SystemMetricsParams,
    TrainParams,
    flatten,
    load_params,
)
from mnist_lstm.runtime import keras, limit_malloc_arenas, tf
from mnist_lstm.tracking import system_metrics
from mnist_lstm.tracking.epochs import EpochMetrics

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


class _Fitting(keras.callbacks.Callback):
    """Marks where `fit` trains: a held SIGINT/SIGTERM is raised between steps (see
    errors.interrupts_held) and, once fit ends, signals act at once again (saving and logging
    are not held up). Records when fit ended."""

    def __init__(self, held: HeldInterrupts) -> None:
        super().__init__()
        self._held = held
        self.ended: float | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._held()

    on_test_batch_end = on_epoch_begin = on_epoch_end = on_train_batch_end

    def on_train_end(self, logs: dict | None = None) -> None:
        self.ended = time.perf_counter()
        self._held.release()


def tune_process() -> None:
    """Process settings that cost nothing in results and save time and memory."""
    limit_malloc_arenas()
    # TensorFlow, Keras and MLflow leave ~400,000 Python objects that live as long as the
    # process. Frozen, the garbage collector stops walking them in every full collection during
    # training and once more at exit (docs/performance-engineering.md).
    gc.freeze()


@dataclasses.dataclass
class Session:
    """What surrounds `fit`: the callbacks it takes, the run they log to (None on a host other
    than the chief, which writes nothing) and where training ran."""

    callbacks: list[keras.callbacks.Callback]
    run: tracking.RunWriter | None
    place: Placement
    processed_md5: str
    fitting: _Fitting
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        """How long `fit` took (training and validation), as timed around the call."""
        return (self.fitting.ended or time.perf_counter()) - self.started

    def log_model(
        self, model: keras.Model, path: Path, md5: str, example: np.ndarray, epochs: int
    ) -> None:
        """The model, the training time and the hashes that tie the run to dvc.lock."""
        if self.place.cluster is not None:
            # Across hosts the trained model lives in the cluster's strategy, where every predict
            # (MLflow infers the signature with one) is a step the other hosts have left: log
            # the saved file's model instead.
            model = keras.models.load_model(path, safe_mode=True)
        lineage = {tracking.TAG_PROCESSED_MD5: self.processed_md5, tracking.TAG_MODEL_MD5: md5}
        tracking.log_training(self.run, model, path, example, lineage, self.seconds, epochs)

    def leave(self, epochs: int) -> int:
        """A host other than the chief: its part of every step is done; the chief writes."""
        cluster = self.place.cluster
        print(
            f"train: {cluster.describe()}, {epochs} epochs done; the chief "
            f"({cluster.describe(0)}) writes the model and logs the run"
        )
        return 0

    def report(self, history: pd.DataFrame, path: Path) -> str:
        seconds, epochs, cluster = self.seconds, len(history), self.place.cluster
        return (
            f"train: {epochs} epochs on {self.place.replicas} device(s)"
            f"{f' across {cluster.size} hosts' if cluster else ''} in {seconds:.1f}s "
            f"({seconds / epochs:.2f}s/epoch), "
            f"val_accuracy {history['val_accuracy'].iloc[-1]:.4f}; model -> {path}; "
            f"MLflow run {self.run.run_id}"
        )


@contextlib.contextmanager
def training_session(
    params: TrainParams,
    monitoring: SystemMetricsParams,
    data_path: Path,
    data: dict[str, np.ndarray],
    place: Placement,
) -> Iterator[Session]:
    """One context for what surrounds `fit`. On the chief (every one-host run) the MLflow run opens
    first, so a store that is down fails before epoch 1, and ends FINISHED, FAILED or KILLED.
    Every host samples its system metrics (tracking/system_metrics.py): the chief into the run
    until just before it ends, the other hosts while fit runs, handing them to the chief then.
    While fit runs, SIGINT/SIGTERM are held to between steps (errors.interrupts_held: raised inside
    TensorFlow's own Python code they can corrupt its state) and, across hosts, a lost host ends
    it in one line."""
    with contextlib.ExitStack() as stack:
        run, md5 = None, ""
        callbacks: list[keras.callbacks.Callback] = []
        if place.is_chief:
            tags = {
                "train.cluster_size": place.cluster.size if place.cluster else 1,
                "train.replicas": place.replicas,
                "train.global_batch_size": params.batch_size * place.replicas,
                tracking.TAG_LSTM_KERNEL: place.kernel,
            }
            logged = {**flatten(params, monitoring), **upstream_params(data)}
            md5 = contracts.md5_file(data_path)
            run = stack.enter_context(
                tracking.training_run(run_name(params), logged, tags, {data_path: md5})
            )
            run.log_datasets(training_datasets(data_path, md5, data, params.tuning_split))
            callbacks.append(EpochMetrics(run))
            cluster = place.cluster
            node = system_metrics.node_id(cluster.rank, cluster.size) if cluster else None
            stack.enter_context(system_metrics.sampling(run, monitoring.interval_s, node))
        if place.cluster is not None:  # the other hosts sample while they fit, for the chief
            from mnist_lstm import distributed  # only across hosts: see distributed.py

            callbacks.append(
                distributed.SystemMetricsToChief(
                    place.strategy, place.cluster, run, monitoring.interval_s
                )
            )
        del data  # not kept alive by this frame: train frees the images once fit is done
        fitting = _Fitting(stack.enter_context(interrupts_held()))
        stack.enter_context(place.failures(while_fitting=lambda: fitting.ended is None))
        yield Session([*callbacks, fitting], run, place, md5, fitting)


def history_table(history: keras.callbacks.History) -> pd.DataFrame:
    """The per-epoch history as the table models/history.csv holds."""
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    return table[list(HISTORY_COLUMNS)]


def save_history(path: Path, history: pd.DataFrame) -> None:
    with contracts.atomic_path(path) as tmp:
        history.to_csv(tmp, index=False, float_format="%.6f")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = contracts.stage_arguments(__doc__, argv, "data", "model", "history")
    params, monitoring = load_params(args.params, "train", "system_metrics")
    tune_process()
    # 1. Load MNIST, scaled to [0, 1] by `normalize` (held as uint8 levels: ~160 MiB less memory).
    data = contracts.load_processed(args.data, levels=True)
    (x_train, y_train), (x_val, y_val) = training_splits(data, params.tuning_split)
    # Devices, hosts (TF_CONFIG; they agree on params, data and code first) and the LSTM kernel
    # come before any other TensorFlow work.
    place = devices.place(params, args.data)
    set_seed(params.seed)
    # 2. Build the tutorial's model: LSTM(64) -> BatchNormalization -> Dense(10) logits.
    with place.strategy.scope():
        model = build_model(params, unroll=place.unroll, kernel=place.kernel)
        # 3. Compile it as the tutorial does: SGD, cross-entropy on the logits, accuracy.
        compile_model(model, params, n_train=len(x_train), replicas=place.replicas)
    place.prepare(model, params.batch_size)  # Keras' fit across hosts; nothing on one host
    model.summary()
    # 4. Fit, logging every epoch. The run opens first: a store that is down fails before epoch 1.
    with training_session(params, monitoring, args.data, data, place) as session:
        history = model.fit(
            training_batches(x_train, y_train, params.batch_size * place.replicas, params.seed),
            # Validation only predicts: big batches make it cheap and measure the same.
            validation_data=validation_batches(x_val, y_val, VALIDATION_BATCH_SIZE),
            shuffle=False,  # the dataset shuffles itself, seeded
            epochs=params.epochs,
            callbacks=session.callbacks,
            # One line per epoch when DVC captures the output; the live bar on a terminal.
            verbose="auto" if sys.stdout.isatty() else 2,
        )
        if session.run is None:  # another host of the cluster: the chief saves and logs
            return session.leave(len(history.epoch))
        # The images are done with: freed before saving and logging, which import and allocate
        # (h5py, MLflow's model code), so that the peak stays fit's (~55 MiB less after it).
        example = contracts.as_pixels(data["x_val"][:2])
        del data, x_train, y_train, x_val, y_val
        gc.collect()
        # 5. Save the model file DVC tracks (identical training, identical bytes) and the history.
        model_md5 = save_model(args.model, model)
        table = history_table(history)
        save_history(args.history, table)
        # 6. Log the model, and the hashes that tie the run to dvc.lock.
        session.log_model(model, args.model, model_md5, example, epochs=len(table))
    print(session.report(table, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
