"""The fused oneDNN LSTM op stands in for Keras' LSTM: same outputs, same gradients, same file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from mnist_lstm import onednn_lstm
from mnist_lstm.errors import UserError
from mnist_lstm.model import build_model, compile_model
from test_model import TUTORIAL


def lstm_model(bidirectional: bool, return_sequences: bool, layers: int = 1) -> keras.Model:
    keras.utils.set_random_seed(1)
    stack: list = [keras.Input((7, 5))]
    for index in range(layers):
        layer = keras.layers.LSTM(16, return_sequences=return_sequences or index < layers - 1)
        stack.append(keras.layers.Bidirectional(layer) if bidirectional else layer)
    if return_sequences:
        stack.append(keras.layers.Flatten())
    stack.append(keras.layers.Dense(3))
    return keras.Sequential(stack)


def forward_backward(model: keras.Model, x: np.ndarray) -> tuple[tf.Tensor, list[tf.Tensor]]:
    with tf.GradientTape() as tape:
        y = model(x, training=True)
        loss = tf.reduce_sum(y * y)
    return y, tape.gradient(loss, model.trainable_variables)


def outputs_and_gradients(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, list]:
    y, grads = forward_backward(model, x)
    return y.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize(
    ("bidirectional", "return_sequences", "layers", "batch"),
    [
        (False, False, 1, 64),  # the tutorial's shape
        (False, True, 1, 5),  # odd batch: shards of 3 and 2
        (True, False, 1, 6),  # the backward direction reads the rows in reverse
        (True, True, 2, 1),  # stacked, and a batch too small to split
    ],
)
def test_fused_lstm_matches_keras_outputs_and_gradients(
    bidirectional, return_sequences, layers, batch, fused_op
):
    keras_model = lstm_model(bidirectional, return_sequences, layers)
    fused_model = lstm_model(bidirectional, return_sequences, layers)
    fused_model.set_weights(keras_model.get_weights())
    assert onednn_lstm.use_onednn(fused_model) == layers * (2 if bidirectional else 1)
    x = np.random.default_rng(0).normal(size=(batch, 7, 5)).astype(np.float32)

    y_keras, grads_keras = outputs_and_gradients(keras_model, x)
    y_fused, grads_fused = outputs_and_gradients(fused_model, x)
    np.testing.assert_allclose(y_fused, y_keras, atol=1e-5)
    for fused, reference in zip(grads_fused, grads_keras, strict=True):
        np.testing.assert_allclose(fused, reference, atol=1e-4, rtol=1e-4)
    # Inside a traced function too, as Keras' fit runs it.
    y_traced, grads_traced = tf.function(lambda: forward_backward(fused_model, x))()
    np.testing.assert_allclose(y_traced.numpy(), y_keras, atol=1e-5)
    for traced, reference in zip(grads_traced, grads_keras, strict=True):
        np.testing.assert_allclose(traced.numpy(), reference, atol=1e-4, rtol=1e-4)


def test_inference_mode_predicts_the_same_and_refuses_a_gradient(fused_op):
    keras_model = lstm_model(bidirectional=True, return_sequences=False)
    fused_model = lstm_model(bidirectional=True, return_sequences=False)
    fused_model.set_weights(keras_model.get_weights())
    onednn_lstm.use_onednn(fused_model)
    x = np.random.default_rng(2).normal(size=(9, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(
        fused_model.predict(x, verbose=0), keras_model.predict(x, verbose=0), atol=1e-5
    )
    with tf.GradientTape() as tape:
        y = fused_model(x, training=False)
    with pytest.raises(ValueError, match="training=True to differentiate"):
        tape.gradient(y, fused_model.trainable_variables)


def test_fused_lstm_gives_the_same_bits_every_time(fused_op):
    model = lstm_model(bidirectional=False, return_sequences=False)
    onednn_lstm.use_onednn(model)
    x = np.random.default_rng(3).normal(size=(64, 7, 5)).astype(np.float32)
    first_y, first_grads = outputs_and_gradients(model, x)
    for _ in range(3):
        y, grads = outputs_and_gradients(model, x)
        assert np.array_equal(y, first_y)
        assert all(np.array_equal(a, b) for a, b in zip(grads, first_grads))


def test_training_through_the_fused_op_saves_a_plain_keras_lstm(tmp_path, fused_op):
    model = compile_model(build_model(TUTORIAL, kernel="onednn"), TUTORIAL, n_train=32)
    x = np.random.default_rng(0).random((32, 28, 28), dtype=np.float32)
    y = np.arange(32) % 10
    before = model.get_layer("lstm").get_weights()[0].copy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not np.array_equal(model.get_layer("lstm").get_weights()[0], before)
    path = tmp_path / "model.keras"
    model.save(path)

    # A fresh process that never loads the op library reads it as Keras' own LSTM.
    script = textwrap.dedent(
        f"""
        import keras, numpy as np, tensorflow as tf
        model = keras.models.load_model({str(path)!r})
        assert type(model.get_layer("lstm")) is keras.layers.LSTM
        x = np.random.default_rng(0).random((32, 28, 28), dtype=np.float32)
        np.save({str(tmp_path / "plain.npy")!r}, model.predict(x, verbose=0))
        with open("/proc/self/maps") as maps:
            assert "onednn_lstm.so" not in maps.read()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    np.testing.assert_allclose(
        np.load(tmp_path / "plain.npy"), model.predict(x, verbose=0), atol=1e-5
    )


def test_the_pooled_readout_trains_through_the_fused_op_with_keras_numbers(fused_op):
    # The tuned preset's shape: both directions, every row's output pooled.
    params = TUTORIAL.model_copy(update=dict(units=16, bidirectional=True, readout="pool"))
    keras_model = build_model(params, kernel="keras")
    fused_model = build_model(params, kernel="onednn")
    fused_model.set_weights(keras_model.get_weights())
    assert "inner_loop" in vars(fused_model.get_layer("bilstm").forward_layer)
    x = np.random.default_rng(0).random((6, 28, 28), dtype=np.float32)
    y_keras, grads_keras = outputs_and_gradients(keras_model, x)
    y_fused, grads_fused = outputs_and_gradients(fused_model, x)
    np.testing.assert_allclose(y_fused, y_keras, atol=1e-5)
    for fused, plain in zip(grads_fused, grads_keras, strict=True):
        np.testing.assert_allclose(fused, plain, atol=1e-4, rtol=1e-4)


def test_the_keras_kernel_leaves_keras_loop_in_place(fused_op):
    assert "inner_loop" not in vars(build_model(TUTORIAL, kernel="keras").get_layer("lstm"))
    assert "inner_loop" in vars(build_model(TUTORIAL, kernel="onednn").get_layer("lstm"))


def test_keras_still_calls_the_inner_loop_hook_the_fused_op_replaces(fused_op, monkeypatch):
    """The op rides on a Keras internal (LSTM.inner_loop); if Keras stopped calling it, training
    would silently take the slow path with every other test green."""
    model = build_model(TUTORIAL, kernel="onednn")
    calls = []
    original = onednn_lstm.lstm
    monkeypatch.setattr(onednn_lstm, "lstm", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.predict(np.zeros((2, 28, 28), np.float32), verbose=0)
    assert calls


def test_a_layer_the_op_cannot_run_is_refused_by_name(fused_op):
    model = keras.Sequential([keras.Input((7, 5)), keras.layers.LSTM(4, activation="relu")])
    with pytest.raises(UserError, match=r"'lstm.*activation is not tanh"):
        onednn_lstm.use_onednn(model)


def train_stage(params: Path, data: Path, out: Path, env: dict[str, str]) -> pd.DataFrame:
    """The train stage's own command (dvc.yaml's), in a fresh process; its history table."""
    subprocess.run(
        [sys.executable, "-m", "mnist_lstm.train", "--params", str(params), "--data", str(data)]
        + ["--model", str(out / "model.keras"), "--history", str(out / "history.csv")],
        env=env,
        check=True,
        capture_output=True,
        timeout=900,
    )
    return pd.read_csv(out / "history.csv")


@pytest.mark.slow
def test_the_tutorial_on_the_full_data_scores_the_same_with_either_kernel(
    tmp_path, write_params, fused_op
):
    """docs/performance.md: the tutorial's metrics are the same with either LSTM kernel. The full
    60,000 images from the packaged MNIST copy, 10 epochs each (~80 s per kernel on 2 cores)."""
    from mnist_lstm import contracts
    from mnist_lstm.fetch import fetch_package, package_wheel_path
    from mnist_lstm.normalize import split

    wheel = package_wheel_path()
    if not wheel.is_file():
        pytest.skip(f"{wheel} is missing: `make install` puts the packaged MNIST copy there")
    data = tmp_path / "mnist.npz"
    contracts.save_processed(data, split(fetch_package(wheel).arrays, 10))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    final = {}
    for kernel in ("keras", "onednn"):
        params = write_params({"train.lstm_kernel": kernel}, name=f"{kernel}.yaml")
        history = train_stage(params, data, tmp_path / kernel, env)
        assert len(history) == 10
        final[kernel] = history["val_accuracy"].iloc[-1]
    assert round(final["onednn"], 3) == round(final["keras"], 3), final
