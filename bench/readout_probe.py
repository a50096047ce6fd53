"""Architecture probes for the tuned preset on the tuning split (docs/performance.md#accuracy).

`python bench/readout_probe.py UNITS EPOCHS rowcol|pool` from the repository root, after
`dvc repro normalize`: trains on the first 55,000 training images, validates on the last 5,000.
rowcol: a Bidirectional LSTM over rows and one over columns; pool: one over rows, read out as the
max and mean of every row's output instead of its last state. Not yet a param of the project.
"""

import sys
import time

from mnist_lstm import contracts, onednn_lstm
from mnist_lstm.input_pipeline import training_batches, validation_batches
from mnist_lstm.runtime import keras
from mnist_lstm.train import set_seed, training_splits

units, epochs, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = contracts.load_processed("data/processed/mnist.npz", levels=True)
(xt, yt), (xv, yv) = training_splits(data, 5000)
set_seed(0)
inp = keras.Input((28, 28))
x = keras.layers.Reshape((28, 28, 1))(inp)
x = keras.layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant")(x)
x = keras.layers.Reshape((28, 28))(x)
if mode == "rowcol":
    rows = keras.layers.Bidirectional(keras.layers.LSTM(units, unroll=True))(x)
    cols = keras.layers.Bidirectional(keras.layers.LSTM(units, unroll=True))(
        keras.layers.Permute((2, 1))(x)
    )
    h = keras.layers.Concatenate()([rows, cols])
else:  # pooled row outputs
    seq = keras.layers.Bidirectional(keras.layers.LSTM(units, unroll=True, return_sequences=True))(
        x
    )
    h = keras.layers.Concatenate()(
        [keras.layers.GlobalMaxPooling1D()(seq), keras.layers.GlobalAveragePooling1D()(seq)]
    )
h = keras.layers.BatchNormalization()(h)
h = keras.layers.Dropout(0.25)(h)
model = keras.Model(inp, keras.layers.Dense(10)(h))
print("routed", onednn_lstm.use_onednn(model))
steps = -(-len(xt) // 256)
model.compile(
    keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.004, epochs * steps)),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
    jit_compile=False,
    steps_per_execution=32,
)
t = time.time()
model.fit(
    training_batches(xt, yt, 256, 0),
    validation_data=validation_batches(xv, yv, 256),
    epochs=epochs,
    verbose=2,
)
print("fit s", round(time.time() - t))
