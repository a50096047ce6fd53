"""Watchdogs: each place the project works around a library bug or leans on a library internal
has a test here that fails when the library changes, saying what to do about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest

from mnist_lstm import onednn_lstm
from mnist_lstm.keras_archive import save_model
from mnist_lstm.model import build_model, compile_model
from test_model import TUTORIAL


def tiny_model() -> keras.Model:
    return keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(10)])


@pytest.mark.xfail(
    strict=True,
    raises=FileNotFoundError,
    reason="mlflow 3.17's keras flavor writes the input example before it creates the model "
    "folder (tracking.models._KerasFlavor creates it first); when this passes, _KerasFlavor "
    "need not create it",
)
def test_mlflow_keras_save_model_with_an_input_example_still_fails_on_its_own(tmp_path):
    import mlflow

    mlflow.keras.save_model(
        tiny_model(), str(tmp_path / "model"), input_example=np.zeros((2, 28, 28), np.float32)
    )


def test_keras_still_stamps_the_save_time_into_its_archive(tmp_path):
    """keras_archive.stabilize_keras_archive pins Keras' save time so that identical training
    gives identical bytes (and DVC hash). When Keras stops stamping it, the rewrite may go."""
    raw = tmp_path / "raw.keras"
    tiny_model().save(raw)
    with zipfile.ZipFile(raw) as archive:
        assert "date_saved" in json.loads(archive.read("metadata.json"))
    stable = tmp_path / "stable.keras"
    save_model(stable, tiny_model())
    with zipfile.ZipFile(stable) as archive:
        assert json.loads(archive.read("metadata.json"))["date_saved"] == "1980-01-01@00:00:00"
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_fit_runs_the_fused_op_through_keras_inner_loop_hook(fused_op, monkeypatch):
    """The op replaces LSTM.inner_loop, a Keras internal. It must run inside `fit` and change
    what training computes; if Keras stopped calling the hook, training would silently take
    Keras' own loop and every other test would still pass."""
    x = np.random.default_rng(0).random((64, 28, 28), dtype=np.float32)
    y = np.arange(64) % 10

    def train(kernel: str) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        model = build_model(TUTORIAL, kernel=kernel)
        compile_model(model, TUTORIAL, n_train=64)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    calls = []
    original = onednn_lstm.lstm
    monkeypatch.setattr(onednn_lstm, "lstm", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = train("onednn")
    assert calls, "Keras' fit no longer calls LSTM.inner_loop: the fused op is never used"
    calls.clear()
    plain = train("keras")
    assert not calls
    # Same seed, same data: weights differ only because the op computed the steps (in another
    # floating-point order), and only slightly.
    assert any(not np.array_equal(a, b) for a, b in zip(fused, plain, strict=True))
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.slow
def test_keras_multi_step_loop_still_fails_under_mirrored_strategy(tmp_path):
    """model.py compiles with steps_per_execution=1 under MirroredStrategy because Keras 3.15's
    multi-step loop fails there. When this script succeeds, that special case can go."""
    script = textwrap.dedent(
        """
        import numpy as np
        import tensorflow as tf
        import keras

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        with tf.distribute.MirroredStrategy(devices).scope():
            model = keras.Sequential([keras.Input((28, 28)), keras.layers.LSTM(8),
                                      keras.layers.Dense(10)])
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          steps_per_execution=4)
        x = np.zeros((256, 28, 28), np.float32)
        y = np.zeros(256, np.int64)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        print("multi-step fit under MirroredStrategy works")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0, (
        "Keras now runs steps_per_execution > 1 under MirroredStrategy: drop the "
        "`if replicas == 1 else 1` special case in model.py"
    )
    assert "You must feed a value for placeholder tensor" in result.stderr, result.stderr[-2000:]


# Two processes on loopback training a tiny model with MultiWorkerMirroredStrategy through
# Keras' fit; MODE: "keras" (fit as it is), "built" (only the model built up front, one of the two
# mends), "mended" (distributed.prepare, what train does).
MULTIWORKER_FIT = """
import os, sys
import numpy as np
import tensorflow as tf
import keras
from mnist_lstm import distributed
mode = sys.argv[1]
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
if mode == "built":
    with strategy.scope():
        model._symbolic_build(data_batch=(keras.KerasTensor((8, 28, 28)),
                                          keras.KerasTensor((8,), "uint8")))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
elif mode == "mended":
    distributed.prepare(model, strategy, 8)
x, y = np.zeros((64, 28, 28), np.float32), np.zeros(64, np.uint8)
model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
print("fit across 2 workers works")
"""


def multiworker_fit(mode: str) -> list[subprocess.CompletedProcess]:
    from conftest import free_port

    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", MULTIWORKER_FIT, mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "keras_says"),
    [
        ("keras", "unsupported type (<class 'tensorflow.python.distribute.values.PerReplica'>)"),
        ("built", "Invalid reduction dimension 0 for input with 0 dimensions"),
    ],
)  # fmt: skip
def test_keras_fit_still_fails_across_workers_without_both_mends(mode, keras_says):
    """distributed.py mends two Keras 3.15 failures of fit under MultiWorkerMirroredStrategy.
    When a mode here trains, Keras fixed that one: drop its mend from distributed.prepare."""
    for result in multiworker_fit(mode):
        assert result.returncode != 0, f"Keras now trains in mode {mode!r}: drop that mend"
        assert keras_says in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_the_mended_fit_trains_across_two_workers():
    for result in multiworker_fit("mended"):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "fit across 2 workers works" in result.stdout


def test_tensorflow_still_leaves_its_all_reduce_pool_open_when_a_reduce_fails():
    """distributed.cluster_failures terminates thread pools TensorFlow's eager all-reduce leaves
    open when a host is lost (their finalizers fail at exit). When TensorFlow closes the pool
    however the reduce ends (a `with` block or `finally`), drop that loop."""
    import inspect

    from tensorflow.python.distribute.cross_device_ops import CollectiveAllReduce

    source = inspect.getsource(CollectiveAllReduce._all_reduce_per_replica_values)
    assert "pool.map(" in source and "pool.close()" in source
    assert "finally" not in source and "with multiprocessing.pool" not in source


def test_mlflow_system_metrics_monitor_still_samples_and_names_as_system_metrics_relies_on(
    monkeypatch,
):
    """tracking/system_metrics.py samples with MLflow's SystemMetricsMonitor (its `monitors`,
    `collect_metrics`, `aggregate_metrics`, each monitor's `clear_metrics`), constructed with a
    store it never contacts, and names the series itself as MLflow's `publish_metrics` does. When
    this fails, follow MLflow's change there (names are what users chart and compare)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from mnist_lstm.tracking import system_metrics

    monitor = SystemMetricsMonitor(
        run_id="", tracking_uri=system_metrics._NO_STORE, node_id="host-1"
    )
    monitor.collect_metrics()
    values = monitor.aggregate_metrics()
    assert {
        "cpu_utilization_percentage",
        "system_memory_usage_megabytes",
        "system_memory_usage_percentage",
        "disk_usage_percentage",
        "network_receive_megabytes",
    } <= values.keys()
    logged = {}
    monkeypatch.setattr(
        monitor.mlflow_logger, "record_metrics", lambda metrics, step: logged.update(metrics)
    )
    monitor.publish_metrics(values)
    assert logged == system_metrics.metric_names(values, "host-1")
    assert "system/host-1/cpu_utilization_percentage" in logged
    assert not any(m.metrics for m in monitor.monitors)  # cleared, as Sampler._clear does
    assert system_metrics.metric_names({"cpu_utilization_percentage": 1.0}) == {
        "system/cpu_utilization_percentage": 1.0
    }


def test_mlflow_system_metrics_loop_still_stops_for_good_at_the_first_failed_get_run(monkeypatch):
    """Why system_metrics.py runs a loop of its own through the RunWriter: MLflow's own monitor
    loop gives up at the first failed `get_run` (a store down for a moment ends a run's system
    metrics) and logs straight to the store. When this fails, MLflow's loop may survive an outage;
    the spool is still needed offline."""
    from mlflow.exceptions import MlflowException
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking.client import MlflowClient

    from mnist_lstm.tracking import system_metrics

    def unreachable(self, run_id):
        raise MlflowException("the store does not answer")

    monkeypatch.setattr(MlflowClient, "get_run", unreachable)
    monitor = SystemMetricsMonitor(
        run_id="x", sampling_interval=0.01, tracking_uri=system_metrics._NO_STORE
    )
    published = []
    monkeypatch.setattr(monitor, "publish_metrics", published.append)
    monitor.monitor()  # returns, instead of sampling on
    assert published == []
