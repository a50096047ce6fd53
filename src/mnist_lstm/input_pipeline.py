"""The tf.data pipelines `fit` reads: the training split in seeded, fixed-size batches and the
validation split in order, gathered from NumPy arrays batch by batch
(docs/performance-engineering.md says what each choice saves).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mnist_lstm import contracts
from mnist_lstm.runtime import tf

# Validation only predicts: batches of 256 measure the same as batches of 1,024 (the same history,
# bit for bit), whose LSTM activations made the largest tensors of fit (the fused op's peak tensor
# memory 148.5 MiB at 1,024, 31 MiB at 256; docs/performance-engineering.md).
VALIDATION_BATCH_SIZE = 256
# Training steps whose images one Python call gathers: a call per step cost ~0.1 s of CPU per epoch
# on this 2-core machine, taken from the training threads.
GATHER_GROUP = 32


def training_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Every image once per epoch, in a fresh seeded order, cut into batches of exactly
    `batch_size`: the last batch is topped up with the epoch's first images.

    Fixed-size batches let TensorFlow specialise the training graph to one static shape instead
    of an unknown batch dimension -- about a quarter of each epoch on this CPU
    (docs/performance-engineering.md). Topping up keeps the tutorial's step count
    (ceil(n / batch)) and trains on every image each epoch, unlike dropping the remainder.
    """
    n = len(x)
    steps = -(-n // batch_size)
    top_up = steps * batch_size - n

    def epoch_steps(order: tf.Tensor) -> tf.Tensor:
        return tf.reshape(tf.concat([order, order[:top_up]], axis=0), (steps, batch_size))

    return (
        tf.data.Dataset.range(n)
        # Reshuffled every epoch from one seed: a rerun sees the same orders.
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .batch(n)
        .map(epoch_steps)
        .unbatch()
        # Rows for GATHER_GROUP steps at a time, then split into the steps again.
        .batch(GATHER_GROUP)
        .map(_gather_from(x, y, (None, batch_size)))
        .unbatch()
        .prefetch(2)
        # `unbatch` hides the length; Keras needs it for its progress and step count.
        .apply(tf.data.experimental.assert_cardinality(steps))
        .with_options(_without_autotune())
    )


def validation_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """The images in order, `batch_size` at a time (the last batch may be smaller)."""
    n = len(x)

    def rows(start: tf.Tensor) -> tf.Tensor:
        return tf.range(start, tf.minimum(start + batch_size, n))

    return (
        tf.data.Dataset.range(0, n, batch_size)
        .map(rows)
        .map(_gather_from(x, y, (None,)))
        .prefetch(1)
        .with_options(_without_autotune())
    )


def _gather_from(
    x: np.ndarray, y: np.ndarray, index_shape: tuple[int | None, ...]
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """A tf.data map from an array of row indices to (float32 pixels, labels) of that shape,
    gathered from the NumPy arrays themselves.

    A TensorFlow copy of the images (`tf.constant`, or what Keras makes of arrays) raised the
    stage's peak memory by 190-280 MiB; images held as uint8 levels (`load_processed`) cost a
    quarter of float32, and `as_pixels` gives the exact float32 values `normalize` wrote. Each call
    is a Python callback (~0.2 ms), hence GATHER_GROUP steps per call
    (docs/performance-engineering.md).
    """

    def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return contracts.as_pixels(x[index]), y[index]

    def batch(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(
            gather, [index], (tf.float32, tf.as_dtype(y.dtype)), stateful=False
        )
        images.set_shape((*index_shape, *x.shape[1:]))
        labels.set_shape(index_shape)
        return images, labels

    return batch


def _without_autotune() -> tf.data.Options:
    # tf.data's autotuner wakes up in the background to re-tune buffers and threads; on two cores it
    # preempts the training threads and made every other epoch ~70% slower
    # (docs/performance-engineering.md).
    # Gathering a batch of 64 rows needs no tuning.
    options = tf.data.Options()
    options.autotune.enabled = False
    return options
