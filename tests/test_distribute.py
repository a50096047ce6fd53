"""More than one device: `train.distribute: auto` mirrors training over every visible device.

This CPU is split into two logical devices (MNIST_LSTM_CPU_DEVICES=2) so MirroredStrategy runs
for real, with the real `dvc repro`; a GPU machine would show its GPUs the same way.
"""

from __future__ import annotations

import json

import pytest

from conftest import LEARNS, locked_model_md5, make_project, run
from mnist_lstm.devices import CPU_DEVICES_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# batch_size is per device, so two devices take twice the images per step (half the steps, and
# BatchNormalization statistics per device). On 30 validation images the trained models may
# differ by an image or so, never by more than this.
TOLERANCE = 0.05
BATCH = LEARNS["train__batch_size"]
EPOCHS = 20  # past the tiny task's noisy first epochs, so the comparison is of trained models


def pipeline(root, devices: str | None, distribute: str) -> dict:
    settings = {**LEARNS, "train__epochs": EPOCHS, "train__distribute": distribute}
    root, env = make_project(root, **settings)
    if devices:
        env[CPU_DEVICES_ENV] = devices
    result = run(["dvc", "repro"], root, env)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("mnist-lstm").experiment_id])
    return {
        "stdout": result.stdout,
        "metrics": json.loads((root / "reports" / "metrics.json").read_text()),
        "tags": logged.data.tags,
        "model_md5": locked_model_md5(root),
    }


def test_two_devices_train_mirrored_within_tolerance_of_one_and_off_means_one(tmp_path):
    one = pipeline(tmp_path / "one", None, "auto")
    two = pipeline(tmp_path / "two", "2", "auto")
    off = pipeline(tmp_path / "off", "2", "off")

    assert "epochs on 1 device(s)" in one["stdout"]
    assert "epochs on 2 device(s)" in two["stdout"]
    assert two["tags"]["train.replicas"] == "2"
    assert two["tags"]["train.global_batch_size"] == str(2 * BATCH)
    for metric in ("val_accuracy", "holdout_accuracy"):
        assert two["metrics"][metric] == pytest.approx(one["metrics"][metric], abs=TOLERANCE)
    assert one["metrics"]["val_accuracy"] >= 0.9  # a comparison between models that learned

    # `off` on the same two devices trains exactly as one device does.
    assert "epochs on 1 device(s)" in off["stdout"] and off["tags"]["train.replicas"] == "1"
    assert off["model_md5"] == one["model_md5"]
