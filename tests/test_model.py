from __future__ import annotations

import dataclasses

import numpy as np

from mnist_lstm.model import build_model
from mnist_lstm.params import TrainParams

TUTORIAL = TrainParams(
    units=64, batch_norm=True, optimizer="sgd", learning_rate=0.01, batch_size=64, epochs=10, seed=0
)


def test_tutorial_model_has_the_tutorials_layers_and_lstm_size():
    model = build_model(TUTORIAL)
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "LSTM", "BatchNormalization", "Dense"
    ]
    assert model.get_layer("lstm").count_params() == 23_808
    assert model.output_shape == (None, 10)
    assert model.optimizer.__class__.__name__ == "SGD"
    assert np.isclose(float(model.optimizer.learning_rate), 0.01)
    assert model.loss.get_config()["from_logits"] is True


def test_params_choose_the_architecture_and_optimizer():
    model = build_model(dataclasses.replace(TUTORIAL, units=8, batch_norm=False, optimizer="adam"))
    assert [layer.__class__.__name__ for layer in model.layers] == ["LSTM", "Dense"]
    assert model.get_layer("lstm").count_params() == 4 * (8 * (28 + 8) + 8)
    assert model.optimizer.__class__.__name__ == "Adam"
    assert model.predict(np.zeros((3, 28, 28), np.float32), verbose=0).shape == (3, 10)
