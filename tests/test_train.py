from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

from mnist_lstm import contracts, tracking
from mnist_lstm.input_pipeline import training_batches, validation_batches
from mnist_lstm.keras_archive import _renumber_shared_objects, save_model
from mnist_lstm.normalize import split


def test_shared_object_ids_are_renumbered_consistently():
    config = {
        "a": {"shared_object_id": 140275352338256},
        "b": [{"shared_object_id": 99}, {"shared_object_id": 140275352338256}],
    }
    assert _renumber_shared_objects(config, {}) == {
        "a": {"shared_object_id": 1},
        "b": [{"shared_object_id": 2}, {"shared_object_id": 1}],
    }


def test_saved_model_has_no_save_time_and_reloads_predicting_identically(tmp_path):
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.LSTM(4), keras.layers.Dense(10)])
    path = tmp_path / "model.keras"
    md5 = save_model(path, model)
    assert md5 == contracts.md5_file(path)
    with zipfile.ZipFile(path) as zf:
        assert json.loads(zf.read("metadata.json"))["date_saved"] == "1980-01-01@00:00:00"
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    x = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    reloaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no temp files left


def epochs_of(dataset, count: int) -> list[list[np.ndarray]]:
    return [[labels.numpy() for _, labels in dataset] for _ in range(count)]


def test_every_image_is_trained_on_each_epoch_in_fixed_size_batches_and_seeded_order():
    # Labels 0..99 name the images; 100 images in batches of 32 leave a remainder of 4.
    x = np.arange(100 * 28 * 28, dtype=np.float32).reshape(100, 28, 28)
    y = np.arange(100)
    dataset = training_batches(x, y, 32, seed=7)
    assert dataset.cardinality() == 4  # what Keras reports as steps per epoch
    first, second = epochs_of(dataset, 2)
    for epoch in (first, second):
        assert [len(batch) for batch in epoch] == [32, 32, 32, 32]  # ceil(100/32) steps, all full
        seen = np.concatenate(epoch)
        assert sorted(set(seen)) == list(range(100))  # every image, every epoch
        np.testing.assert_array_equal(seen[100:], seen[:28])  # topped up with the epoch's first
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))  # reshuffled
    again = epochs_of(training_batches(x, y, 32, seed=7), 2)
    assert all(np.array_equal(a, b) for a, b in zip(sum(again, []), sum([first, second], [])))
    # Images travel with their labels.
    images, labels = next(iter(training_batches(x, y, 32, seed=7)))
    np.testing.assert_array_equal(images.numpy(), x[labels.numpy()])


def test_an_epoch_longer_than_one_gather_keeps_every_batch_whole_and_with_its_labels():
    from mnist_lstm.input_pipeline import GATHER_GROUP

    n = 2 * GATHER_GROUP + 5  # batches of 2: two full gathers and a short third one
    x = np.arange(n * 28 * 28, dtype=np.float32).reshape(n, 28, 28)
    batches = list(training_batches(x, np.arange(n), 2, seed=3))
    assert [len(labels) for _, labels in batches] == [2] * -(-n // 2)
    assert sorted(set(np.concatenate([labels for _, labels in batches]))) == list(range(n))
    for images, labels in batches:
        np.testing.assert_array_equal(images.numpy(), x[labels.numpy()])


def test_images_held_as_levels_are_trained_on_as_the_float32_pixels_normalize_wrote():
    levels = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    images, labels = next(iter(training_batches(levels, np.arange(40), 16, seed=0)))
    assert images.dtype == "float32"
    expected = contracts.pixels_from_levels(levels[labels.numpy()])
    assert images.numpy().tobytes() == expected.tobytes()


def test_validation_reads_every_image_once_in_order_with_a_smaller_last_batch():
    levels = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    batches = list(validation_batches(levels, np.arange(10), 4))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in batches]), range(10))
    images = np.concatenate([images for images, _ in batches])
    assert images.tobytes() == contracts.pixels_from_levels(levels).tobytes()


def test_an_exact_multiple_of_the_batch_size_is_not_topped_up():
    x = np.zeros((64, 28, 28), np.float32)
    (epoch,) = epochs_of(training_batches(x, np.arange(64), 32, seed=0), 1)
    assert sorted(np.concatenate(epoch)) == list(range(64))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("raised", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_a_run_that_fails_or_is_interrupted_never_stays_running(store, raised, status):
    import mlflow

    with pytest.raises(raised):
        with tracking.training_run("unit", {"train.units": 1}) as run:
            raise raised("boom")
    assert mlflow.MlflowClient().get_run(run.run_id).info.status == status


def test_tuning_split_validates_on_the_last_training_images_never_the_validation_split(tiny_raw):
    from mnist_lstm.params import ParamsError
    from mnist_lstm.train import training_splits

    data = split(tiny_raw, 10)
    (x_fit, y_fit), (x_check, y_check) = training_splits(data, 20)
    assert len(x_fit) == 100 and len(x_check) == 20
    np.testing.assert_array_equal(x_check, data["x_train"][-20:])
    (_, _), (x_val, _) = training_splits(data, 0)
    assert x_val is data["x_val"]
    with pytest.raises(ParamsError, match="train.tuning_split must leave training images: got 120"):
        training_splits(data, 120)


def test_train_refuses_a_processed_file_tampered_with_between_stages(
    tiny_raw, tmp_path, write_params, capsys
):
    from mnist_lstm.train import main

    processed = split(tiny_raw, 10)
    processed["x_train"] = (processed["x_train"] * 255).astype(np.float32)  # un-normalized pixels
    data = tmp_path / "processed.npz"
    contracts.write_npz(data, processed)
    status = main(
        [
            "--params",
            str(write_params()),
            "--data",
            str(data),
            "--model",
            str(tmp_path / "m.keras"),
            "--history",
            str(tmp_path / "h.csv"),
        ]
    )
    assert status == 1
    assert f"error: {data}: array 'x_train' must hold pixels in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "m.keras").exists()


# What a real one-host train leaves loaded: run in a fresh process, as the stage runs.
ONE_HOST_TRAIN = """
import sys
from keras.src.backend.tensorflow import trainer
from mnist_lstm.train import main
keras_reduce = trainer.reduce_per_replica
status = main(sys.argv[1:])
print("STATUS", status)
print("MODULES", " ".join(sorted(m for m in sys.modules if m.startswith("mnist_lstm"))))
print("PATCHED", trainer.reduce_per_replica is not keras_reduce)
"""


@pytest.mark.slow
def test_one_host_training_never_loads_or_patches_the_multi_host_code(
    tiny_raw, tmp_path, write_params
):
    """distributed.py reaches into Keras' private trainer; a one-host run must not even import it,
    so a Keras release that moves those internals cannot break the tutorial's path."""
    import os
    import subprocess
    import sys

    data = tmp_path / "processed.npz"
    contracts.write_npz(data, split(tiny_raw, 10))
    params = write_params({"train.epochs": 1, "train.units": 8, "train.batch_size": 32})
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, "-c", ONE_HOST_TRAIN, "--params", str(params), "--data", str(data)]
        + ["--model", str(tmp_path / "m.keras"), "--history", str(tmp_path / "h.csv")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines.get("STATUS") == "0", result.stderr[-3000:]
    modules = lines["MODULES"].split()
    assert "mnist_lstm.devices" in modules and "mnist_lstm.train" in modules
    assert "mnist_lstm.distributed" not in modules
    assert lines["PATCHED"] == "False"
    assert (tmp_path / "m.keras").exists()
