"""Training across hosts: everything only a multi-host run needs, imported only when TF_CONFIG
is set (devices.py), so the one-host path never loads it and no Keras internal is patched there.

Here: the MultiWorkerMirroredStrategy over the hosts `TF_CONFIG` names (cluster.py reads it),
formed within a bound (`strategy`) by hosts that agree on what they train (`agree`: params, data,
code); the two mends Keras 3.15's `fit` needs under it (`prepare`); a lost host turned into
one line (`cluster_failures`); and each host's system metrics handed to the chief, which logs the
run (`SystemMetricsToChief`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import multiprocessing.pool
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import yaml

from mnist_lstm import contracts
from mnist_lstm.cluster import (
    TF_CONFIG_ENV,
    Cluster,
    cluster_timeout,
    disagreement,
    formation_bound,
)
from mnist_lstm.errors import UserError, one_line
from mnist_lstm.params import TrainParams, flatten
from mnist_lstm.runtime import keras, tf
from mnist_lstm.tracking import RunWriter, system_metrics

# The errors that mean a host went away (killed, its link down, the cluster aborted because of
# it); any other error of TensorFlow's is a bug or a mistake and is reported as what it is.
LOST_HOST_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
)


def strategy(
    params: TrainParams, cluster: Cluster, fingerprint: Callable[[], dict[str, str]]
) -> tf.distribute.Strategy:
    """A MultiWorkerMirroredStrategy over the cluster's hosts: each host's replicas (one per local
    device) join one all-reduce ring. Create it before any other TensorFlow work: it starts this
    host's server. Returns once every host has joined (within MNIST_LSTM_CLUSTER_TIMEOUT) and
    agreed on what they train (`agree`); otherwise every host stops with one line."""
    if params.distribute == "off":
        raise UserError(
            f"{TF_CONFIG_ENV} names {cluster.size} hosts but train.distribute is off: set it "
            f"to auto to train across them, or unset {TF_CONFIG_ENV} on this host"
        )
    timeout = cluster_timeout(os.environ)
    try:
        with formation_bound(cluster, timeout):
            # TensorFlow reads TF_CONFIG itself (TFConfigClusterResolver).
            formed = tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.OpError as err:  # e.g. this host's port is taken
        raise UserError(
            f"training across {cluster.size} hosts: {cluster.describe()} could not join the "
            f"cluster ({one_line(err.message, limit=160, default=type(err).__name__)}); check "
            f"{TF_CONFIG_ENV} and that its port is free"
        ) from None
    with cluster_failures(cluster, while_fitting=lambda: True):
        agree(formed, cluster, fingerprint())
    # Checked after the hosts agree, so that all of them stop here together.
    if params.hosts != cluster.size:
        raise UserError(
            f"training across {cluster.size} hosts: train.hosts is {params.hosts} but "
            f"{TF_CONFIG_ENV} names {cluster.size}; set train.hosts: {cluster.size} in "
            "params.yaml (committed, so every host has it) -- a model of a cluster is cached "
            "apart from a one-host model"
        )
    return formed


# --- agreeing ---


def fingerprint(
    params: TrainParams, data: Path | None, stages: Path = Path("dvc.yaml")
) -> dict[str, str]:
    """What every host must have the same of: each train param, the processed data's md5 and each
    file of code dvc.yaml lists as the train stage's dependency (hashed as DVC hashes them)."""
    found = {key: repr(value) for key, value in flatten(params).items()}
    if data is not None:
        found["the processed data"] = contracts.md5_file(data)
    if stages.is_file():
        deps = yaml.safe_load(stages.read_text())["stages"]["train"]["deps"]
        for dep in deps:
            path = stages.parent / dep
            if path.is_file() and path.suffix in (".py", ".cc", ".h"):
                found[dep] = contracts.md5_file(path)
    return found


def _digest(text: str) -> list[int]:
    """Two int32s of text's sha256: what crosses the network for each key and each value."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], dtype="<i4").tolist()


def agree(formed: tf.distribute.Strategy, cluster: Cluster, found: dict[str, str]) -> None:
    """Every host's fingerprint against the chief's, before epoch 1: hosts that differ in params,
    data or code would train a model none of them describes (or fail on a shape mismatch).
    Two all-gathers: how many keys each host has, then every host's (key, value) digests, padded
    to the longest. Every host reaches the same verdict and stops with the same line."""
    names = {tuple(_digest(key)): key for key in found}
    rows = [[*_digest(key), *_digest(value)] for key, value in sorted(found.items())]
    sizes = _gather(formed, np.array([[cluster.rank, len(rows)]], dtype=np.int32))
    width = int(sizes[:, 1].max())
    mine = np.zeros((1, 1 + 4 * width), dtype=np.int32)
    mine[0, 0] = cluster.rank
    mine[0, 1 : 1 + 4 * len(rows)] = np.array(rows, dtype=np.int32).ravel()
    gathered = _gather(formed, mine)
    tables: list[dict[tuple, tuple]] = [{} for _ in range(cluster.size)]
    for row in gathered:
        rank, cells = int(row[0]), row[1:].reshape(-1, 4)
        count = int(sizes[sizes[:, 0] == rank][0, 1])
        tables[rank] = {(int(a), int(b)): (int(c), int(d)) for a, b, c, d in cells[:count]}
    line = disagreement(cluster, names, tables)
    if line:
        raise UserError(line)


def _gather(formed: tf.distribute.Strategy, value: np.ndarray) -> np.ndarray:
    """`value` of every replica of every host, stacked (one row per replica)."""
    tensor = tf.constant(value)
    return formed.gather(formed.run(lambda: tf.identity(tensor)), axis=0).numpy()


def share(formed: tf.distribute.Strategy, cluster: Cluster, payload: bytes) -> list[bytes]:
    """Every host's `payload`, by rank, on every host. Every host must call it (two all-gathers:
    how many bytes each host has, then every host's bytes as int32 words, padded to the longest);
    none at all when every payload is empty."""
    sizes = _gather(formed, np.array([[cluster.rank, len(payload)]], dtype=np.int32))
    size_of = {int(rank): int(size) for rank, size in sizes}
    shared = [b""] * cluster.size
    words = -(-max(size_of.values()) // 4)
    if not words:
        return shared
    mine = np.zeros((1, 1 + words), dtype=np.int32)
    mine[0, 0] = cluster.rank
    mine[0, 1:] = np.frombuffer(payload.ljust(4 * words, b"\0"), dtype="<i4")
    for row in _gather(formed, mine):
        rank = int(row[0])
        shared[rank] = row[1:].astype("<i4").tobytes()[: size_of[rank]]
    return shared


class SystemMetricsToChief(keras.callbacks.Callback):
    """The hosts other than the chief sample their system metrics while fit runs (every
    `interval` seconds) and, when it ends, hand them to the chief (`share`: every host takes
    part), which logs each host's series under its node id (`system/host-1/...`); its own go to
    the run live. Only the chief writes to MLflow. Samples lost on the way (a host gone) are one
    line, never a failed stage; a host's sampler writes nothing, so one that fit leaves running
    (an error) ends with its process."""

    def __init__(
        self,
        formed: tf.distribute.Strategy,
        cluster: Cluster,
        run: RunWriter | None,
        interval: float,
    ) -> None:
        super().__init__()
        self._formed, self._cluster, self._run = formed, cluster, run
        self._sampler = system_metrics.Sampler(interval)

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self._cluster.is_chief:
            self._sampler.start()

    def on_train_end(self, logs: dict | None = None) -> None:
        mine = b""
        if not self._cluster.is_chief:
            self._sampler.stop()
            samples = self._sampler.samples
            mine = json.dumps(samples).encode() if samples else b""
        try:
            shared = share(self._formed, self._cluster, mine)
            if self._run is None:
                return
            for rank, payload in enumerate(shared):
                if rank != self._cluster.rank and payload:
                    node = system_metrics.node_id(rank, self._cluster.size)
                    system_metrics.log_samples(self._run, json.loads(payload), node)
        except Exception as err:  # noqa: BLE001 - system metrics never fail training
            print(
                f"system metrics: the other hosts' samples were not logged ({one_line(err)}); "
                "training goes on",
                flush=True,
            )


# --- Keras 3.15's `fit` across hosts ---
#
# `model.fit` under a MultiWorkerMirroredStrategy with more than one worker fails twice in Keras
# 3.15 (Keras 2 ran it; tensorflow/tensorflow#72388):
# 1. Before the first step `fit` builds the model from one batch of data, which it first averages
#    across replicas with `strategy.reduce` -- an all-reduce of the images themselves. With several
#    workers TensorFlow cannot reduce the (images, labels) pair: "Attempt to convert a value
#    (PerReplica...) to a Tensor".
# 2. After every step it averages the logged values (loss, accuracy) across workers with
#    `strategy.reduce("MEAN", value, axis=0)`; they are scalars, which have no axis 0: "Invalid
#    reduction dimension 0 for input with 0 dimensions".
# `prepare` mends both, in a process that trains across hosts only: the model is built from the
# per-replica batch shape before `fit` (so its build step has nothing to do and is skipped), and the
# averaging of scalars reduces over all their elements (`axis=None`: the same mean, as
# MirroredStrategy's path computes it). tests/test_upstream.py fails when Keras no longer needs
# either, so they can go.


def prepare(model: keras.Model, strategy: tf.distribute.Strategy, batch_size: int) -> None:
    """Lets `model.fit` run under `strategy`, a MultiWorkerMirroredStrategy over several hosts."""
    from keras.src.backend.tensorflow import trainer  # Keras' private trainer: see above

    images = keras.KerasTensor((batch_size, *model.input_shape[1:]), "float32")
    labels = keras.KerasTensor((batch_size,), "uint8")
    with strategy.scope():
        model._symbolic_build(data_batch=(images, labels))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        """Keras' reduction, with its multi-worker mean over a scalar's elements (Keras: axis 0)."""
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica


@contextlib.contextmanager
def cluster_failures(cluster: Cluster, while_fitting: Callable[[], bool]) -> Iterator[None]:
    """A host of the cluster lost mid-training (killed, its link down): TensorFlow's collective
    or coordination error (Unavailable, Aborted, Cancelled, DeadlineExceeded) becomes one line.
    Its training steps cannot go on without it. Any other error, and any error after fit
    (saving and logging run on this host alone), is what it is."""
    lost = None
    try:
        yield
    except LOST_HOST_ERRORS as err:
        if not while_fitting():
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
