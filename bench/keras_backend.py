"""The project's model in plain Keras 3 on any backend (KERAS_BACKEND=jax|torch|tensorflow).

For machines where TensorFlow is not installed, such as the GPU machine behind the GPU figures in
docs/performance.md (its image carries JAX and PyTorch with CUDA). Same model, data, loss,
optimizer, batch and epochs as the train stage; prints one JSON line like the other bench scripts.
"""

import argparse
import json
import time

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="data/raw/mnist.npz")
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()
keras.utils.set_random_seed(0)

with np.load(args.data) as npz:
    x_train = npz["x_train"].astype(np.float32) / 255.0
    y_train = npz["y_train"]
    x_val = npz["x_test"][:-10].astype(np.float32) / 255.0
    y_val = npz["y_test"][:-10]

model = keras.Sequential(
    [
        keras.Input((28, 28)),
        keras.layers.LSTM(64),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(10),
    ]
)
model.compile(
    optimizer=keras.optimizers.SGD(0.01),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
    steps_per_execution=32,
)


class EpochTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


timer = EpochTimes()
history = model.fit(
    x_train,
    y_train,
    validation_data=(x_val, y_val),
    batch_size=64,
    validation_batch_size=1024,
    epochs=args.epochs,
    callbacks=[timer],
    verbose=0,
)
print(
    json.dumps(
        {
            "backend": keras.backend.backend(),
            "epoch_seconds": timer.seconds,
            "val_accuracy": history.history["val_accuracy"][-1],
        }
    )
)
