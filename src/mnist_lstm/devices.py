"""Which devices train: one by default, a MirroredStrategy over several GPUs (or logical CPUs).

`MNIST_LSTM_CPU_DEVICES=N` splits the CPU into N logical devices before TensorFlow touches one, so
multi-device training runs (and is tested) on a machine without a second device.
"""

from __future__ import annotations

from collections.abc import Mapping

from mnist_lstm.errors import UserError
from mnist_lstm.params import TrainParams
from mnist_lstm.runtime import tf

# Splits the CPU into N logical devices: multi-device training, testable without a second device.
CPU_DEVICES_ENV = "MNIST_LSTM_CPU_DEVICES"


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
