from __future__ import annotations

import numpy as np
import pytest

from mnist_lstm import contracts
from mnist_lstm.normalize import main, normalize_images, split
from mnist_lstm.params import ParamsError


def test_pixels_become_float32_in_unit_range():
    x = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out = normalize_images(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[0.0, 0.2, 1.0]]])


def test_splits_follow_the_tutorial(tiny_raw):
    out = split(tiny_raw, holdout_size=10)
    assert len(out["x_train"]) == 120
    assert len(out["x_val"]) == 30 and len(out["x_holdout"]) == 10
    # The holdout is the *last* test images, validation everything before them.
    np.testing.assert_array_equal(out["y_holdout"], tiny_raw["y_test"][-10:])
    np.testing.assert_array_equal(out["x_val"], tiny_raw["x_test"][:-10] / np.float32(255))
    contracts.check_processed("mem", out)


def test_holdout_must_leave_validation_images(tiny_raw):
    with pytest.raises(
        ParamsError, match="normalize.holdout_size must leave validation images: got 40"
    ):
        split(tiny_raw, holdout_size=40)


def test_stage_writes_checked_processed_file(tiny_npz, tmp_path, write_params):
    out = tmp_path / "processed.npz"
    assert main(["--params", str(write_params()), "--raw", str(tiny_npz), "--out", str(out)]) == 0
    processed = contracts.load_processed(out)
    assert processed["x_train"].dtype == np.float32 and processed["x_train"].max() <= 1.0


def test_stage_refuses_tampered_raw_file(tiny_raw, tmp_path, write_params, capsys):
    tiny_raw["y_test"] = tiny_raw["y_test"].astype(np.int64)
    bad = tmp_path / "raw.npz"
    np.savez(bad, **tiny_raw)
    out = tmp_path / "processed.npz"
    assert main(["--params", str(write_params()), "--raw", str(bad), "--out", str(out)]) == 1
    assert (
        f"error: {bad}: array 'y_test' must be (n,) uint8, got (40,) int64"
        in capsys.readouterr().err
    )
    assert not out.exists()
