"""The tutorial's model: each 28x28 image is read as 28 timesteps (rows) of 28 pixels."""

from __future__ import annotations

import keras

from mnist_lstm.contracts import IMAGE_SHAPE, NUM_CLASSES
from mnist_lstm.params import TrainParams

_OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "rmsprop": keras.optimizers.RMSprop,
}


def build_model(params: TrainParams) -> keras.Model:
    """LSTM -> BatchNormalization -> Dense logits, compiled as the tutorial compiles it."""
    layers = [
        # A fixed length of 28 rows (the tutorial allows None) lets the LSTM unroll the same
        # way every batch; the weights are identical either way.
        keras.Input(shape=IMAGE_SHAPE, name="rows"),
        # Only the last hidden state feeds the classifier: the whole image has been read by then.
        keras.layers.LSTM(params.units, name="lstm"),
    ]
    if params.batch_norm:
        # Rescales the LSTM's final state, which lets plain SGD at 0.01 converge in 10 epochs.
        layers.append(keras.layers.BatchNormalization(name="batch_norm"))
    # Logits, not probabilities: the loss applies the softmax itself (from_logits=True).
    layers.append(keras.layers.Dense(NUM_CLASSES, name="logits"))
    model = keras.Sequential(layers, name="mnist_lstm")
    model.compile(
        optimizer=_OPTIMIZERS[params.optimizer](learning_rate=params.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
