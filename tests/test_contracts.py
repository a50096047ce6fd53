from __future__ import annotations

import zipfile

import numpy as np
import pytest

from mnist_lstm import contracts
from mnist_lstm.normalize import split


def test_npz_files_are_byte_identical_for_identical_arrays(tiny_raw, tmp_path):
    contracts.save_raw(tmp_path / "a.npz", tiny_raw)
    contracts.save_raw(tmp_path / "b.npz", tiny_raw)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.testing.assert_array_equal(
        contracts.load_raw(tmp_path / "a.npz")["x_train"], tiny_raw["x_train"]
    )


def test_a_failed_write_leaves_the_previous_file_intact(tiny_raw, tmp_path):
    path = tmp_path / "raw.npz"
    contracts.save_raw(path, tiny_raw)
    before = path.read_bytes()
    broken = dict(tiny_raw, y_train=tiny_raw["y_train"][:3])
    with pytest.raises(contracts.ContractError):
        contracts.save_raw(path, broken)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw.npz"]


def test_processed_pixels_outside_unit_range_are_refused(tiny_raw, tmp_path):
    processed = split(tiny_raw, 10)
    processed["x_val"] = processed["x_val"] * 255
    path = tmp_path / "processed.npz"
    contracts.write_npz(path, processed)
    with pytest.raises(
        contracts.ContractError, match=f"{path}: array 'x_val' must hold pixels in \\[0, 1\\]"
    ):
        contracts.load_processed(path)


def test_pickled_object_arrays_are_never_loaded(tiny_raw, tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **dict(tiny_raw, x_train=np.array([object()], dtype=object)))
    with pytest.raises(contracts.ContractError, match="not a readable .npz file"):
        contracts.load_raw(path)


def test_npz_files_use_plain_zip_headers_that_every_python_311_writes_alike(tiny_raw, tmp_path):
    # zip64 headers (force_zip64) come out differently across Python 3.11 patch releases.
    contracts.write_npz(tmp_path / "a.npz", tiny_raw)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert {(i.create_version, i.extract_version) for i in zf.infolist()} == {(20, 20)}


def test_images_load_as_uint8_levels_that_give_back_the_very_same_pixels(
    tiny_raw, tmp_path, monkeypatch
):
    monkeypatch.setattr(contracts, "_LEVEL_CHUNK_ROWS", 7)  # several reads, a partial last one
    path = tmp_path / "processed.npz"
    contracts.save_processed(path, split(tiny_raw, 10))
    pixels = contracts.load_processed(path)
    levels = contracts.load_processed(path, levels=True)
    assert levels.keys() == pixels.keys()
    for key in ("x_train", "x_val", "x_holdout"):
        assert levels[key].dtype == np.uint8  # a quarter of the memory
        assert contracts.as_pixels(levels[key]).tobytes() == pixels[key].tobytes()  # bit for bit
    np.testing.assert_array_equal(levels["x_train"], tiny_raw["x_train"])
    np.testing.assert_array_equal(levels["x_holdout"], tiny_raw["x_test"][-10:])
    np.testing.assert_array_equal(levels["y_val"], pixels["y_val"])


def test_images_that_are_not_exact_levels_load_as_float32_unchanged(
    tiny_raw, tmp_path, monkeypatch
):
    monkeypatch.setattr(contracts, "_LEVEL_CHUNK_ROWS", 7)
    processed = split(tiny_raw, 10)
    processed["x_train"][-1, 0, 0] = 0.5  # in [0, 1] but no level / 255, in the last read
    path = tmp_path / "processed.npz"
    contracts.save_processed(path, processed)
    loaded = contracts.load_processed(path, levels=True)
    assert loaded["x_train"].dtype == np.float32
    assert loaded["x_train"].tobytes() == processed["x_train"].tobytes()
    assert loaded["x_val"].dtype == np.uint8  # judged array by array


@pytest.mark.parametrize("bad", [np.nan, -0.5, 2.0])
def test_images_outside_unit_range_are_refused_when_read_as_levels(tiny_raw, tmp_path, bad):
    processed = split(tiny_raw, 10)
    processed["x_holdout"][3, 4, 5] = bad
    path = tmp_path / "processed.npz"
    contracts.write_npz(path, processed)
    with pytest.raises(
        contracts.ContractError, match=f"{path}: array 'x_holdout' must hold pixels in \\[0, 1\\]"
    ):
        contracts.load_processed(path, levels=True)
