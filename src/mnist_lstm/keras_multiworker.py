"""What Keras 3.15's `fit` needs to train under TensorFlow's MultiWorkerMirroredStrategy.

`model.fit` under a MultiWorkerMirroredStrategy with more than one worker fails twice in Keras
3.15 (Keras 2 ran it; tensorflow/tensorflow#72388):

1. Before the first step `fit` builds the model from one batch of data, which it first averages
   across replicas with `strategy.reduce` -- an all-reduce of the images themselves. With several
   workers TensorFlow cannot reduce the (images, labels) pair: "Attempt to convert a value
   (PerReplica...) to a Tensor".
2. After every step it averages the logged values (loss, accuracy) across workers with
   `strategy.reduce("MEAN", value, axis=0)`; they are scalars, which have no axis 0: "Invalid
   reduction dimension 0 for input with 0 dimensions".

`prepare` mends both for one process that trains across hosts, and only there: the model is built
from the per-replica batch shape before `fit` (so its build step has nothing to do and is
skipped), and the averaging of scalars reduces over all their elements (`axis=None`: the same
mean, as MirroredStrategy's path computes it). Everything else is Keras' own `fit`. tests/
test_upstream.py fails when Keras no longer needs either, so they can go.
"""

from __future__ import annotations

from keras.src.backend.tensorflow import trainer as _trainer

from mnist_lstm.runtime import keras, tf

_keras_reduce_per_replica = _trainer.reduce_per_replica


def _reduce_per_replica(values, strategy, reduction):
    """Keras' reduction, with its multi-worker mean over a scalar's elements (Keras: axis 0)."""
    if reduction in ("auto", "mean") and _trainer._collective_all_reduce_multi_worker(strategy):
        return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _keras_reduce_per_replica(values, strategy, reduction)


def prepare(model: keras.Model, strategy: tf.distribute.Strategy, batch_size: int) -> None:
    """Lets `model.fit` run under `strategy` when it spans several workers; nothing otherwise."""
    if not _trainer._collective_all_reduce_multi_worker(strategy):
        return
    images = keras.KerasTensor((batch_size, *model.input_shape[1:]), "float32")
    labels = keras.KerasTensor((batch_size,), "uint8")
    with strategy.scope():
        model._symbolic_build(data_batch=(images, labels))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    _trainer.reduce_per_replica = _reduce_per_replica
