"""Training across hosts: everything only a multi-host run needs, imported only when TF_CONFIG
is set (devices.py), so the one-host path never loads it and no Keras internal is patched there.

`TF_CONFIG` is TensorFlow's own cluster spec, set on every host (docs/team.md), e.g.
`{"cluster": {"worker": ["10.0.0.2:2222", "10.0.0.3:2222"]},
  "task": {"type": "worker", "index": 0}}`.

Here: reading the spec (`cluster_from`), the MultiWorkerMirroredStrategy, the two mends Keras 3.15's
`fit` needs under it (`prepare`), and a lost host turned into one line (`cluster_failures`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing.pool
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from mnist_lstm.errors import UserError, one_line
from mnist_lstm.params import TrainParams
from mnist_lstm.runtime import keras, tf

TF_CONFIG_ENV = "TF_CONFIG"
# The roles MultiWorkerMirroredStrategy trains with (`ps`, `evaluator`: other strategies').
TRAINING_JOBS = ("chief", "worker")
_EXAMPLE = (
    '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
)


@dataclass(frozen=True)
class Cluster:
    """The hosts TF_CONFIG names, chief first, and which of them this process is."""

    hosts: tuple[str, ...]
    rank: int
    workers: int  # how many of the hosts are `worker` tasks (the rest: the `chief`)

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def is_chief(self) -> bool:
        """The `chief` task, else worker 0: the one host that writes outputs and logs the run
        (TensorFlow's own rule for who saves)."""
        return self.rank == 0

    def describe(self, rank: int | None = None) -> str:
        rank = self.rank if rank is None else rank
        return f"host {rank} ({self.hosts[rank]})"

    def failure(self, message: str) -> str:
        """One line for TensorFlow's error when the cluster broke mid-training: which host went
        silent and how (the coordination service's heartbeat report, or a refused connection to
        its address) and what to do."""
        # The silent host: the heartbeat report's, else the remote target's, else the address
        # named (never this host's own, which the failed op's device names too).
        task = re.search(r"unhealthy.*?/job:(chief|worker)/replica:\d+/task:(\d+)", message, re.S)
        task = task or re.search(
            r"remote target /job:(chief|worker)/replica:\d+/task:(\d+)", message
        )
        others = [host for rank, host in enumerate(self.hosts) if rank != self.rank]
        address = next((host for host in others if host in message), None)
        if task:
            kind, index = task.group(1), int(task.group(2))
            rank = index if kind == "chief" else self.size - self.workers + index
        else:
            rank = self.hosts.index(address) if address else None
        if "unhealthy" in message:
            how = "stopped answering (no heartbeat)"
        elif "Connection refused" in message:
            how = "refused the connection (its training is gone)"
        else:
            how = f"failed ({one_line(message, last=True, limit=160, default='no message')})"
        who = self.describe(rank) if rank is not None else "a host"
        return (
            f"training across {self.size} hosts: {who} {how}; steps cannot go on without it, "
            "nothing was written: start train again on every host"
        )


def cluster_from(env: Mapping[str, str]) -> Cluster | None:
    """The cluster TF_CONFIG names; None without TF_CONFIG. A malformed spec is a one-line error
    here, before TensorFlow starts a server with it."""
    raw = env.get(TF_CONFIG_ENV, "").strip()
    if not raw:
        return None

    def bad(what: str) -> UserError:
        return UserError(
            f"{TF_CONFIG_ENV}: {what}; expected TensorFlow's cluster spec, e.g. {_EXAMPLE}"
        )

    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise bad(f"not JSON ({err.msg} at character {err.pos})") from None
    cluster, task = (spec.get("cluster"), spec.get("task")) if isinstance(spec, dict) else (0, 0)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise bad('it needs a "cluster" and a "task" object')
    others = sorted(set(cluster) - set(TRAINING_JOBS))
    if others:
        raise bad(f"job(s) {', '.join(others)} are not for this strategy (only chief and worker)")
    jobs = {job: cluster.get(job, []) for job in TRAINING_JOBS}
    if len(jobs["chief"]) > 1 or not all(
        isinstance(hosts, list) and all(isinstance(h, str) and ":" in h for h in hosts)
        for hosts in jobs.values()
    ):
        raise bad('"chief" is at most one "host:port", "worker" a list of them')
    hosts = tuple(jobs["chief"] + jobs["worker"])
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in TRAINING_JOBS or not isinstance(index, int):
        raise bad(f'task type must be "chief" or "worker" with an integer index, got {task}')
    if not 0 <= index < len(jobs[kind]):
        raise bad(f"task {kind} {index} is not in the cluster ({len(jobs[kind])} {kind} task(s))")
    rank = index if kind == "chief" else len(jobs["chief"]) + index
    return Cluster(hosts=hosts, rank=rank, workers=len(jobs["worker"]))


def strategy(params: TrainParams, cluster: Cluster) -> tf.distribute.Strategy:
    """A MultiWorkerMirroredStrategy over the cluster's hosts: each host's replicas (one per local
    device) join one all-reduce ring. Create it before any other TensorFlow work: it starts this
    host's server."""
    if params.distribute == "off":
        raise UserError(
            f"{TF_CONFIG_ENV} names {cluster.size} hosts but train.distribute is off: set it "
            f"to auto to train across them, or unset {TF_CONFIG_ENV} on this host"
        )
    # TensorFlow reads TF_CONFIG itself (TFConfigClusterResolver).
    return tf.distribute.MultiWorkerMirroredStrategy()


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
    or coordination error becomes one line. Its training steps cannot go on without it. After
    fit, an error is what it is (saving and logging run on this host alone)."""
    lost = None
    try:
        yield
    except tf.errors.OpError as err:
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
