"""Where an epoch of the train stage goes, per LSTM kernel: feeding the batches alone, the
training steps, and validation, timed one after the other in one process on the full data.

`python bench/epoch_breakdown.py [--kernels onednn keras] [--epochs 3]` (after `make run`, which
writes data/processed/mnist.npz). Builds and compiles the model exactly as the stage does, then
per epoch times: iterating the training batches without training (the input pipeline), `fit` for
one epoch without validation (steps, which include feeding them), and `evaluate` on the
validation batches (what validation adds to each epoch). Prints one JSON line per kernel; the
figures after the first epoch (which traces and compiles) are the medians reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["onednn", "keras"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO / "data/processed/mnist.npz")
    args = parser.parse_args()

    from mnist_lstm import contracts, devices, train
    from mnist_lstm.input_pipeline import (
        VALIDATION_BATCH_SIZE,
        training_batches,
        validation_batches,
    )
    from mnist_lstm.model import build_model, compile_model
    from mnist_lstm.params import TrainParams

    raw = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    train.tune_process()
    data = contracts.load_processed(args.data, levels=True)
    (x_train, y_train), (x_val, y_val) = train.training_splits(data, 0)
    for kernel in args.kernels:
        params = TrainParams(**{**raw, "lstm_kernel": kernel})
        place = devices.place(params, args.data)
        train.set_seed(params.seed)
        model = build_model(params, unroll=place.unroll, kernel=place.kernel)
        compile_model(model, params, n_train=len(x_train))
        batches = training_batches(x_train, y_train, params.batch_size, params.seed)
        validation = validation_batches(x_val, y_val, VALIDATION_BATCH_SIZE)
        figures: dict[str, list[float]] = {"feed_s": [], "train_steps_s": [], "validation_s": []}
        for _ in range(args.epochs):
            started = time.perf_counter()
            for _ in batches:
                pass
            figures["feed_s"].append(time.perf_counter() - started)
            started = time.perf_counter()
            model.fit(batches, epochs=1, shuffle=False, verbose=0)
            figures["train_steps_s"].append(time.perf_counter() - started)
            started = time.perf_counter()
            model.evaluate(validation, verbose=0)
            figures["validation_s"].append(time.perf_counter() - started)
        medians = {name: statistics.median(values[1:]) for name, values in figures.items()}
        print(json.dumps({"kernel": place.kernel, **medians, "all": figures}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
