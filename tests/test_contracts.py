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
