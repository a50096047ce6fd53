"""Saving a Keras model so that identical training gives an identical file, and DVC hash."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from mnist_lstm import contracts
from mnist_lstm.runtime import keras

# A `.keras` file is a zip. Keras stamps the save time into `metadata.json` and into the zip entry
# of the weights, and numbers shared objects in `config.json` by their Python id() (a memory
# address). Pinning all three makes identical training give an identical file (and DVC hash).
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FIXED_SAVE_DATE = "1980-01-01@00:00:00"


def _renumber_shared_objects(config: object, ids: dict[int, int]) -> object:
    """Replace id()-based `shared_object_id`s by 1, 2, ... in order of first appearance."""
    if isinstance(config, dict):
        return {
            key: ids.setdefault(value, len(ids) + 1)
            if key == "shared_object_id"
            else _renumber_shared_objects(value, ids)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_renumber_shared_objects(item, ids) for item in config]
    return config


def stabilize_keras_archive(src: Path, dst: Path) -> None:
    """Copy a `.keras` archive with its run-varying bytes (save time, zip times) pinned."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            payload = zin.read(info.filename)
            if info.filename == "metadata.json":
                metadata = json.loads(payload)
                metadata["date_saved"] = _FIXED_SAVE_DATE
                payload = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                payload = json.dumps(_renumber_shared_objects(json.loads(payload), {})).encode()
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME), payload)


def save_model(path: Path, model: keras.Model) -> str:
    """Write the model atomically and byte-reproducibly; its md5, as dvc.lock will record it.
    A full disk, even while Keras writes its own file, is one WriteError naming `path`."""
    with contracts.atomic_path(path) as final, contracts.scratch_path(path) as raw:
        model.save(raw)
        stabilize_keras_archive(raw, final)
    return contracts.md5_file(path)
