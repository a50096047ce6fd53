"""Where training runs: one device by default, a MirroredStrategy over several GPUs (or logical
CPUs), across hosts when TF_CONFIG names them (distributed.py, imported only where TF_CONFIG is
set), and with which LSTM kernel (onednn_lstm.choose_kernel).

`MNIST_LSTM_CPU_DEVICES=N` splits the CPU into N logical devices before TensorFlow touches one, so
multi-device training runs (and is tested) on a machine without a second device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_lstm.errors import UserError
from mnist_lstm.onednn_lstm import choose_kernel
from mnist_lstm.params import TrainParams
from mnist_lstm.runtime import keras, tf

if TYPE_CHECKING:
    from mnist_lstm.cluster import Cluster

# Splits the CPU into N logical devices: multi-device training, testable without a second device.
CPU_DEVICES_ENV = "MNIST_LSTM_CPU_DEVICES"
TF_CONFIG_ENV = "TF_CONFIG"


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


def local_strategy(params: TrainParams) -> tf.distribute.Strategy:
    """With `distribute: auto` over more than one local device (GPUs, else logical CPUs), a
    MirroredStrategy -- a model replica per device, gradients all-reduced every step. Otherwise
    TensorFlow's default, one device."""
    devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
        d.name for d in tf.config.list_logical_devices("CPU")
    ]
    if params.distribute == "off" or len(devices) < 2:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices)


@dataclass(frozen=True)
class Placement:
    """The strategy training runs under, the LSTM kernel, and the hosts (None: this one)."""

    strategy: tf.distribute.Strategy
    kernel: str
    cluster: Cluster | None = None

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def unroll(self) -> bool:
        """Unrolled on the CPU; on a GPU Keras' cuDNN kernel, which unrolling would rule out."""
        return not tf.config.list_logical_devices("GPU")

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the outputs and logs the run (every one-host process)."""
        return self.cluster is None or self.cluster.is_chief

    def prepare(self, model: keras.Model, batch_size: int) -> None:
        """What Keras' fit needs across hosts (distributed.prepare); nothing on one host."""
        if self.cluster is not None:
            from mnist_lstm import distributed

            distributed.prepare(model, self.strategy, batch_size)

    def failures(
        self, while_fitting: Callable[[], bool]
    ) -> contextlib.AbstractContextManager[None]:
        """Across hosts, a host lost while fitting ends training in one line
        (distributed.cluster_failures); nothing on one host."""
        if self.cluster is None:
            return contextlib.nullcontext()
        from mnist_lstm import distributed

        return distributed.cluster_failures(self.cluster, while_fitting)


def place(params: TrainParams, data: Path | None = None) -> Placement:
    """The devices, hosts and LSTM kernel this process trains with; says the kernel in a line.
    Across hosts, each compares its params, `data` (the processed file) and code with the others'
    before any training (distributed.agree).

    Call it before any other TensorFlow work: splitting the CPU and a multi-host strategy (which
    starts this host's server) must come first.
    """
    split_cpu(os.environ)
    cluster, strategy = None, None
    if os.environ.get(TF_CONFIG_ENV, "").strip():
        from mnist_lstm import distributed  # only with TF_CONFIG: see distributed.py
        from mnist_lstm.cluster import cluster_from

        cluster = cluster_from(os.environ)
        if cluster is not None and cluster.size > 1:
            strategy = distributed.strategy(
                params, cluster, lambda: distributed.fingerprint(params, data)
            )
        else:  # one host named: it trains as any one host does
            cluster = None
    if cluster is None and params.hosts > 1:
        raise UserError(
            f"train.hosts is {params.hosts} but {TF_CONFIG_ENV} names no cluster on this host: "
            f"set {TF_CONFIG_ENV} on each of the {params.hosts} hosts (docs/team.md), or "
            "train.hosts: 1 to train here alone"
        )
    if strategy is None:
        strategy = local_strategy(params)
    # The fused oneDNN op where it is built and usable, else Keras' own LSTM (cuDNN on a GPU).
    kernel, why = choose_kernel(params.lstm_kernel)
    print(f"train: LSTM kernel {kernel} ({why})", flush=True)
    return Placement(strategy, kernel, cluster)
