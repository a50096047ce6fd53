"""Architecture probes for the tuned preset on the tuning split (docs/performance.md#accuracy).

`python bench/readout_probe.py UNITS EPOCHS rowcol|pool|conv [SEED] [SPLIT]` from the repository
root, after `dvc repro normalize`: the tuned preset (params.yaml + params.tuned.yaml) with batches
of 256 and a learning rate of 0.004, trained on the training images but the last SPLIT (5,000 by
default) and validated on those. rowcol: a Bidirectional LSTM over rows and one over columns;
pool: one over rows, read out as the max and mean of every row's output instead of its last
state -- the prototype of `train.readout: pool`; conv: the same pooled LSTM over the 14 rows of a
convolutional stem (32 3x3 filters, ReLU, 2x2 max pooling), which the project's model does not
have. Kept so that the probe rows in performance.md rerun as they were measured.
"""

import sys
import time

from mnist_lstm import contracts, onednn_lstm
from mnist_lstm.input_pipeline import training_batches, validation_batches
from mnist_lstm.model import compile_model
from mnist_lstm.params import parse_section, read_yaml
from mnist_lstm.runtime import keras
from mnist_lstm.train import set_seed, training_splits

units, epochs, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
split = int(sys.argv[5]) if len(sys.argv) > 5 else 5000
probe = dict(units=units, epochs=epochs, seed=seed, batch_size=256, learning_rate=0.004)
raw = {**read_yaml("params.yaml")["train"], **read_yaml("params.tuned.yaml")["train"], **probe}
params = parse_section("train", {**raw, "tuning_split": split})
data = contracts.load_processed("data/processed/mnist.npz", levels=True)
(xt, yt), (xv, yv) = training_splits(data, params.tuning_split)
set_seed(params.seed)
shift = params.augment_shift / 28
inp = keras.Input((28, 28))
x = keras.layers.Reshape((28, 28, 1))(inp)
x = keras.layers.RandomTranslation(shift, shift, fill_mode="constant")(x)
if mode == "conv":
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Reshape((14, 14 * 32))(x)
else:
    x = keras.layers.Reshape((28, 28))(x)
if mode == "rowcol":
    rows = keras.layers.Bidirectional(keras.layers.LSTM(units, unroll=True))(x)
    cols = keras.layers.Bidirectional(keras.layers.LSTM(units, unroll=True))(
        keras.layers.Permute((2, 1))(x)
    )
    h = keras.layers.Concatenate()([rows, cols])
else:  # pool, conv: pooled row outputs
    seq = keras.layers.Bidirectional(keras.layers.LSTM(units, unroll=True, return_sequences=True))(
        x
    )
    h = keras.layers.Concatenate()(
        [keras.layers.GlobalMaxPooling1D()(seq), keras.layers.GlobalAveragePooling1D()(seq)]
    )
h = keras.layers.BatchNormalization()(h)
h = keras.layers.Dropout(params.dropout)(h)
model = keras.Model(inp, keras.layers.Dense(10)(h))
print("routed", onednn_lstm.use_onednn(model))
compile_model(model, params, n_train=len(xt))
t = time.time()
model.fit(
    training_batches(xt, yt, params.batch_size, params.seed),
    validation_data=validation_batches(xv, yv, 256),
    epochs=params.epochs,
    verbose=2,
)
print("fit s", round(time.time() - t))
