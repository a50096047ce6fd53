"""Time the holdout prediction as `evaluate` makes it: one batched call, after validation."""

import json
import sys
import time

import numpy as np

from mnist_lstm.evaluate import load_model, predict_logits

model = load_model(sys.argv[1])
with np.load(sys.argv[2]) as npz:
    x_val, x_holdout = npz["x_val"], npz["x_holdout"]
predict_logits(model, x_val[:1024])  # evaluate scores validation first
started = time.perf_counter()
predict_logits(model, x_holdout)
print(json.dumps({"holdout_seconds": time.perf_counter() - started}))
