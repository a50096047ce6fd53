"""Time the holdout prediction as `evaluate` makes it: one batched call, after the validation pass."""

import json
import sys
import time

import keras
import numpy as np

model = keras.models.load_model(sys.argv[1], safe_mode=True)
with np.load(sys.argv[2]) as npz:
    x_val, x_holdout = npz["x_val"], npz["x_holdout"]
model.predict(x_val, batch_size=1024, verbose=0)  # evaluate scores validation first
started = time.perf_counter()
model.predict(x_holdout, verbose=0)
print(json.dumps({"holdout_seconds": time.perf_counter() - started}))
