"""The tutorial's model: each 28x28 image is read as 28 timesteps (rows) of 28 pixels.

With the defaults it is exactly the tutorial's LSTM(64) -> BatchNormalization -> Dense(10).
The other params grow it without leaving "an LSTM reading rows": both directions, stacked layers,
a readout pooled over every row, dropout, a cosine learning-rate schedule and shift augmentation.
No convolutions.
"""

from __future__ import annotations

import math

from mnist_lstm import onednn_lstm
from mnist_lstm.contracts import IMAGE_SHAPE, NUM_CLASSES
from mnist_lstm.params import TrainParams
from mnist_lstm.runtime import keras

STEPS_PER_EXECUTION = 32

_OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "rmsprop": keras.optimizers.RMSprop,
}


def learning_rate(
    params: TrainParams, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    if params.schedule == "cosine":
        # Decays smoothly to 0 at the last step: big steps early, fine-tuning at the end.
        return keras.optimizers.schedules.CosineDecay(
            params.learning_rate, decay_steps=params.epochs * steps_per_epoch
        )
    return params.learning_rate


def build_model(params: TrainParams, unroll: bool = True, kernel: str = "keras") -> keras.Model:
    """The row-reading LSTM classifier (build it inside the strategy's scope).

    `unroll=False` leaves the LSTM to Keras' cuDNN kernel on a GPU (unrolling rules it out).
    `kernel` is the one `onednn_lstm.choose_kernel` chose for `params.lstm_kernel`: "keras" (every
    platform) or "onednn" (the fused op, where it is built).
    """
    # A fixed length of 28 rows (the tutorial allows None) lets the LSTM unroll the same way every
    # batch; the weights are identical either way.
    layers: list = [keras.Input(shape=IMAGE_SHAPE, name="rows")]
    if params.augment_shift:
        # Handwriting sits anywhere near the centre; shifted copies teach that, in training only.
        factor = params.augment_shift / IMAGE_SHAPE[0]
        layers += [
            keras.layers.Reshape((*IMAGE_SHAPE, 1)),
            keras.layers.RandomTranslation(factor, factor, fill_mode="constant", name="shift"),
            keras.layers.Reshape(IMAGE_SHAPE),
        ]
    pooled = params.readout == "pool"
    for index in range(params.layers):
        last = index == params.layers - 1
        # readout last: only the last layer's final state feeds the classifier (the whole image
        # has been read); pool: every row's output of the last layer does.
        name = "lstm" if index == 0 else f"lstm_{index}"
        # Unrolled: 28 steps are few and fixed, so one straight-line graph beats a while loop on
        # CPU (measured with `make bench`; docs/performance-engineering.md).
        lstm = keras.layers.LSTM(
            params.units, return_sequences=pooled or not last, unroll=unroll, name=name
        )
        if params.bidirectional:
            lstm = keras.layers.Bidirectional(lstm, name=f"bi{name}")
        layers.append(lstm)
        if params.dropout and not last:
            layers.append(keras.layers.Dropout(params.dropout, name=f"dropout_{index}"))
    head: list = []
    if params.batch_norm:
        # Rescales the LSTM's final state, which lets plain SGD at 0.01 converge in 10 epochs.
        head.append(keras.layers.BatchNormalization(name="batch_norm"))
    if params.dropout:
        head.append(keras.layers.Dropout(params.dropout, name="dropout"))
    # Logits, not probabilities: the loss applies the softmax itself (from_logits=True).
    head.append(keras.layers.Dense(NUM_CLASSES, name="logits"))
    if pooled:
        model = _pooled(layers, head)
    else:
        model = keras.Sequential(layers + head, name="mnist_lstm")
    if kernel == "onednn":
        # The same layers and weights, trained through one fused oneDNN kernel per layer and
        # direction instead of ~40 TensorFlow ops per timestep; the saved model stays plain Keras.
        onednn_lstm.use_onednn(model)
    return model


def _pooled(body: list, head: list) -> keras.Model:
    """`body` (input to the last LSTM's per-row outputs), read out as the maximum and the mean of
    each feature over the 28 rows, then `head`. A stroke anywhere in the image counts as much as
    one in the last rows (measured: docs/performance.md#accuracy)."""
    inputs, x = body[0], body[0]
    for layer in body[1:]:
        x = layer(x)
    x = keras.layers.Concatenate(name="readout")(
        [
            keras.layers.GlobalMaxPooling1D(name="row_max")(x),
            keras.layers.GlobalAveragePooling1D(name="row_mean")(x),
        ]
    )
    for layer in head:
        x = layer(x)
    return keras.Model(inputs, x, name="mnist_lstm")


def compile_model(
    model: keras.Model, params: TrainParams, n_train: int = 60_000, replicas: int = 1
) -> keras.Model:
    """Compiled as the tutorial compiles it: the optimizer, cross-entropy on logits, accuracy.

    `replicas` devices each take `batch_size` images per step (the global batch), so an epoch has
    ceil(n_train / (batch_size * replicas)) steps, which a schedule decays over. Compile inside
    the strategy's scope (the optimizer's variables live there).
    """
    steps_per_epoch = math.ceil(n_train / (params.batch_size * replicas))
    model.compile(
        optimizer=_OPTIMIZERS[params.optimizer](
            learning_rate=learning_rate(params, steps_per_epoch)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # Running 32 steps per call cuts the Python and dispatch overhead that dominates batches
        # of 64 (same math, same batches). No XLA: Keras switches it off under op determinism,
        # which byte-identical reruns need.
        jit_compile=False,
        # Keras 3.15's multi-step loop fails under MirroredStrategy ("You must feed a value for
        # placeholder tensor ... while/cond"): one step per call there.
        steps_per_execution=STEPS_PER_EXECUTION if replicas == 1 else 1,
    )
    return model
