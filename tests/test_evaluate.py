from __future__ import annotations

import keras
import numpy as np
import pytest

from mnist_lstm import contracts
from mnist_lstm.evaluate import confusion_matrix, cross_entropy, load_model, per_class_report


def test_confusion_matrix_lists_every_digit_even_unseen_ones():
    matrix = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert matrix.shape == (10, 10)
    assert matrix.loc[1, 2] == 1 and matrix.loc[1, 1] == 1 and matrix.to_numpy().sum() == 4


def test_per_class_report_matches_hand_computed_values():
    report = per_class_report(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    assert report.loc[0, "precision"] == 1.0 and report.loc[0, "recall"] == 0.5
    assert report.loc[1, "precision"] == pytest.approx(2 / 3) and report.loc[1, "recall"] == 1.0
    assert report.loc[1, "f1"] == pytest.approx(0.8)
    assert report.loc[5].tolist() == [0.0, 0.0, 0.0, 0]  # absent digit: zeros, not NaN


def test_cross_entropy_matches_the_training_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)).astype(np.float32)
    y = rng.integers(0, 10, size=50)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert cross_entropy(logits, y) == pytest.approx(float(keras_loss), rel=1e-5)


def test_a_damaged_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(contracts.ContractError, match=f"{path}: not a loadable Keras model"):
        load_model(path)
