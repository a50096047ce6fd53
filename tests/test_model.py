from __future__ import annotations

import numpy as np
import pytest

from mnist_lstm.model import build_model, compile_model
from mnist_lstm.params import TrainParams
from mnist_lstm.runtime import keras

TUTORIAL = TrainParams(
    units=64,
    batch_norm=True,
    optimizer="sgd",
    learning_rate=0.01,
    batch_size=64,
    epochs=10,
    seed=0,
    bidirectional=False,
    layers=1,
    readout="last",
    dropout=0.0,
    schedule="constant",
    augment_shift=0,
    tuning_split=0,
    distribute="auto",
    hosts=1,
    lstm_kernel="auto",
)


def test_tutorial_model_has_the_tutorials_layers_and_lstm_size():
    model = compile_model(build_model(TUTORIAL), TUTORIAL)
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "LSTM",
        "BatchNormalization",
        "Dense",
    ]
    assert model.get_layer("lstm").count_params() == 23_808
    assert model.output_shape == (None, 10)
    assert model.optimizer.__class__.__name__ == "SGD"
    assert np.isclose(float(model.optimizer.learning_rate), 0.01)
    assert model.loss.get_config()["from_logits"] is True


def test_params_choose_the_architecture_and_optimizer():
    params = TUTORIAL.model_copy(update=dict(units=8, batch_norm=False, optimizer="adam"))
    model = compile_model(build_model(params), params)
    assert [layer.__class__.__name__ for layer in model.layers] == ["LSTM", "Dense"]
    assert model.get_layer("lstm").count_params() == 4 * (8 * (28 + 8) + 8)
    assert model.optimizer.__class__.__name__ == "Adam"
    assert model.predict(np.zeros((3, 28, 28), np.float32), verbose=0).shape == (3, 10)


def test_defaults_of_the_new_params_leave_the_tutorial_model_untouched():
    model = build_model(TUTORIAL)
    assert [layer.name for layer in model.layers] == ["lstm", "batch_norm", "logits"]


def test_bidirectional_stacked_dropout_and_augmented_model():
    params = TUTORIAL.model_copy(
        update=dict(units=8, bidirectional=True, layers=2, dropout=0.2, augment_shift=2)
    )
    model = build_model(params)
    names = [layer.__class__.__name__ for layer in model.layers]
    assert names == [
        "Reshape",
        "RandomTranslation",
        "Reshape",
        "Bidirectional",
        "Dropout",
        "Bidirectional",
        "BatchNormalization",
        "Dropout",
        "Dense",
    ]
    first, second = model.get_layer("bilstm"), model.get_layer("bilstm_1")
    assert first.output.shape == (None, 28, 16)  # both directions, every row: feeds the next LSTM
    assert second.output.shape == (None, 16)
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    # Shifts and dropout act in training only: inference is deterministic.
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


def test_pooled_readout_reads_every_row_of_the_last_lstm():
    params = TUTORIAL.model_copy(
        update=dict(units=8, bidirectional=True, layers=2, dropout=0.2, readout="pool")
    )
    model = build_model(params)
    names = [layer.__class__.__name__ for layer in model.layers]
    assert names == [
        "InputLayer",
        "Bidirectional",
        "Dropout",
        "Bidirectional",
        "GlobalMaxPooling1D",
        "GlobalAveragePooling1D",
        "Concatenate",
        "BatchNormalization",
        "Dropout",
        "Dense",
    ]
    assert model.get_layer("bilstm_1").output.shape == (None, 28, 16)  # every row, both ways
    assert model.get_layer("readout").output.shape == (None, 32)  # max and mean of each feature
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    logits = model.predict(x, verbose=0)
    assert logits.shape == (4, 10)
    np.testing.assert_array_equal(logits, model.predict(x, verbose=0))  # dropout: training only


def test_pooled_readout_survives_a_keras_save_and_load(tmp_path):
    params = TUTORIAL.model_copy(update=dict(units=8, readout="pool", augment_shift=2))
    model = compile_model(build_model(params), params)
    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_cosine_schedule_decays_to_zero_over_all_steps():
    params = TUTORIAL.model_copy(
        update=dict(optimizer="adam", learning_rate=0.002, schedule="cosine", epochs=4)
    )
    model = compile_model(build_model(params), params, n_train=640)  # 10 steps/epoch at 64
    schedule = (
        model.optimizer.learning_rate
        if callable(model.optimizer.learning_rate)
        else model.optimizer._learning_rate
    )
    assert float(schedule(0)) == pytest.approx(0.002)
    assert float(schedule(20)) == pytest.approx(0.001, rel=1e-3)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-9)
