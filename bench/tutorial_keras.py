"""The tutorial's own Keras script, as published, reading the same data from data/raw/mnist.npz.

No DVC, no MLflow, no project code: the baseline `make bench` compares against. Prints one JSON
line with per-epoch seconds and the final validation accuracy.
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="data/raw/mnist.npz")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--predict-holdout", action="store_true")
args = parser.parse_args()

with np.load(args.data) as npz:
    (x_train, y_train), (x_test, y_test) = (
        (npz["x_train"], npz["y_train"]),
        (npz["x_test"], npz["y_test"]),
    )
x_train, x_test = x_train / 255.0, x_test / 255.0
x_validate, y_validate = x_test[:-10], y_test[:-10]
x_test, y_test = x_test[-10:], y_test[-10:]

model = keras.Sequential()
model.add(keras.Input(shape=(None, 28)))
model.add(layers.LSTM(64))
model.add(layers.BatchNormalization())
model.add(layers.Dense(10))
model.compile(
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    optimizer="sgd",
    metrics=["accuracy"],
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
    validation_data=(x_validate, y_validate),
    batch_size=64,
    epochs=args.epochs,
    callbacks=[timer],
    verbose=0,
)
result = {"epoch_seconds": timer.seconds, "val_accuracy": history.history["val_accuracy"][-1]}
if args.predict_holdout:
    started = time.perf_counter()
    for i in range(10):  # the tutorial's loop: one predict call per image
        tf.argmax(model.predict(tf.expand_dims(x_test[i], 0), verbose=0), axis=1)
    result["holdout_seconds"] = time.perf_counter() - started
print(json.dumps(result))
