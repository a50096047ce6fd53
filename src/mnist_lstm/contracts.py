"""What each stage writes, and readers that check it before anyone trusts it.

raw (fetch)         `.npz`: x_train (n,28,28) uint8, y_train (n,) uint8, x_test (m,28,28) uint8,
                    y_test (m,) uint8 -- the layout of Keras' own mnist.npz.
processed           `.npz`: x_train, x_val, x_holdout (n,28,28) float32 in [0, 1];
  (normalize)       y_train, y_val, y_holdout (n,) uint8 in 0..9.
                    Pixels are pixel levels / 255 (`pixels_from_levels`), so a reader may hold
                    them as their uint8 levels, a quarter of the memory (`load_processed`).

Every file is written atomically (temp file + rename, fsynced: `replace_durably`), so an
interrupted stage, a crash or a full disk never leaves a half-written output, and every reader
uses `allow_pickle=False`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mnist_lstm.errors import UserError, one_line

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
RAW_KEYS = ("x_train", "y_train", "x_test", "y_test")
PROCESSED_SPLITS = ("train", "val", "holdout")


class ContractError(UserError):
    """A file between stages is missing, damaged or not in the documented layout."""


class WriteError(UserError):
    """An output could not be written (a full disk, a read-only folder); the old file stands."""


def write_failure(err: OSError) -> str:
    """Why a write failed, for one line: a full disk said as such, else the system's words."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({err.strerror})"
    return err.strerror or one_line(err)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` survive a power cut (POSIX; NTFS journals it)."""
    if os.name == "nt":  # a directory cannot be opened, nor needs to be
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """`os.replace(tmp, path)` that a crash cannot turn into an empty or half file: the new bytes
    reach the disk before the rename names them (ext4 and xfs may commit a rename before the data
    it names), and the directory holding the rename after."""
    with open(tmp, "rb+") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def stage_arguments(
    doc: str, argv: list[str] | None, *paths: str, params: bool = True
) -> argparse.Namespace:
    """A stage's command line: the paths dvc.yaml passes it (`--out` -> `args.out`, all required)
    and, for a stage that reads params, `--params` (default params.yaml)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if params:
        parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in paths:
        parser.add_argument(f"--{name}", type=Path, required=True)
    return parser.parse_args(argv)


@contextlib.contextmanager
def scratch_path(near: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `near` (same filesystem); it is removed afterwards, always."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=near.parent, prefix=f".{near.name}.", suffix=suffix or near.suffix
    )
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path`, durably, only if the block succeeds.
    An OSError meanwhile (a full disk) is a WriteError naming `path`: the old file, or none,
    stays, and the temp file is gone."""
    path = Path(path)
    try:
        with scratch_path(path) as tmp:
            yield tmp
            replace_durably(tmp, path)
    except OSError as err:
        raise WriteError(
            f"cannot write {path}: {write_failure(err)}; free space there (or make it writable) "
            "and rerun the stage; the previous file, if any, is unchanged"
        ) from None


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _digest_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return _digest_file(path, "sha256")


def md5_file(path: Path) -> str:
    """The hash DVC 3 records for a file in dvc.lock (plain md5 of its bytes)."""
    return _digest_file(path, "md5")


def sha256_array(arr: np.ndarray) -> str:
    """The digest of the array's C-order bytes, the form the canonical MNIST digests use."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def pixels_from_levels(levels: np.ndarray) -> np.ndarray:
    """uint8 pixel levels [0, 255] -> float32 pixels [0, 1]: the tutorial's normalization."""
    return levels.astype(np.float32) / np.float32(255.0)


def as_pixels(images: np.ndarray) -> np.ndarray:
    """float32 pixels of images held either way `load_processed` returns them."""
    return pixels_from_levels(images) if images.dtype == np.uint8 else images


# Rows converted per read when loading pixel levels: bounds the float32 bytes held at once (~6 MB).
_LEVEL_CHUNK_ROWS = 2048


def _read_levels(path: Path, npz: np.lib.npyio.NpzFile, key: str) -> np.ndarray | None:
    """Image array `key` as uint8 levels, read in chunks so its float32 form is never whole in
    memory; None unless every pixel is exactly a level / 255 (or the array is not a float32 image
    array at all: the plain reader then reports that)."""
    with npz.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(member)
        if dtype != np.dtype("<f4") or fortran_order or tuple(shape[1:]) != IMAGE_SHAPE:
            return None
        levels = np.empty(shape, np.uint8)
        flat = levels.reshape(len(levels), -1)
        for start in range(0, len(flat), _LEVEL_CHUNK_ROWS):
            rows = flat[start : start + _LEVEL_CHUNK_ROWS]
            chunk = np.frombuffer(member.read(rows.size * 4), np.float32)
            if chunk.size != rows.size:
                raise ContractError(f"{path}: array '{key}' is truncated")
            if not (np.isfinite(chunk).all() and chunk.min() >= 0.0 and chunk.max() <= 1.0):
                raise ContractError(f"{path}: array '{key}' must hold pixels in [0, 1]")
            codes = np.rint(chunk * np.float32(255.0)).astype(np.uint8)
            if not np.array_equal(pixels_from_levels(codes), chunk):
                return None
            rows[:] = codes.reshape(rows.shape)
        return levels


def _read_npz(
    path: Path, keys: tuple[str, ...], as_levels: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in keys if key not in npz.files]
            if missing:
                raise ContractError(
                    f"{path}: missing array(s) {', '.join(missing)}; expected {', '.join(keys)}"
                )
            arrays = {}
            for key in keys:
                levels = _read_levels(path, npz, key) if key in as_levels else None
                arrays[key] = npz[key] if levels is None else levels
            return arrays
    except ContractError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ContractError(f"{path}: not a readable .npz file ({one_line(err)})") from None


def _check(path: Path, key: str, arr: np.ndarray, dtype: str, shape: tuple) -> None:
    expected = (
        "("
        + ",".join("n" if dim is None else str(dim) for dim in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )
    ok_shape = arr.ndim == len(shape) and all(e is None or e == a for e, a in zip(shape, arr.shape))
    if arr.dtype != np.dtype(dtype) or not ok_shape:
        raise ContractError(
            f"{path}: array '{key}' must be {expected} {dtype}, got {arr.shape} {arr.dtype}"
        )


def _check_labels(path: Path, key: str, y: np.ndarray) -> None:
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        bad = y[(y < 0) | (y >= NUM_CLASSES)][0]
        raise ContractError(f"{path}: array '{key}' holds label {bad}; labels must be 0..9")


def _check_pairs(path: Path, arrays: dict[str, np.ndarray], splits: tuple[str, ...]) -> None:
    for split in splits:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ContractError(
                f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels"
            )
        if len(x) == 0:
            raise ContractError(f"{path}: x_{split} is empty")


def check_raw(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raise ContractError unless `arrays` are in the layout of Keras' mnist.npz."""
    for key in RAW_KEYS:
        if key not in arrays:
            raise ContractError(f"{path}: missing array '{key}'; expected {', '.join(RAW_KEYS)}")
        if key.startswith("x_"):
            _check(path, key, arrays[key], "uint8", (None, *IMAGE_SHAPE))
        else:
            _check(path, key, arrays[key], "uint8", (None,))
            _check_labels(path, key, arrays[key])
    _check_pairs(path, arrays, ("train", "test"))
    return {key: arrays[key] for key in RAW_KEYS}


def load_raw(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    return check_raw(path, _read_npz(path, RAW_KEYS))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but byte-identical for identical arrays (np.savez stamps the current time).

    Uncompressed like Keras' own file: the fastest to read, and DVC stores it once anyway.
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            # No force_zip64: Python 3.11.2 and 3.11.7 write its version fields differently (the
            # same arrays gave other bytes, so another dvc.lock, on CI). Members stay < 2 GiB.
            with zf.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def save_raw(path: Path, arrays: dict[str, np.ndarray]) -> None:
    check_raw(path, arrays)
    write_npz(path, {key: arrays[key] for key in RAW_KEYS})


def processed_keys() -> tuple[str, ...]:
    return tuple(f"{axis}_{split}" for split in PROCESSED_SPLITS for axis in ("x", "y"))


def check_processed(
    path: Path, arrays: dict[str, np.ndarray], levels: bool = False
) -> dict[str, np.ndarray]:
    """Raise ContractError unless `arrays` are normalized splits: float32 in [0, 1], labels 0..9.
    With `levels`, images may also be held as uint8 pixel levels (see `load_processed`)."""
    for key in processed_keys():
        if key not in arrays:
            raise ContractError(
                f"{path}: missing array '{key}'; expected {', '.join(processed_keys())}"
            )
        arr = arrays[key]
        if key.startswith("x_") and levels and arr.dtype == np.uint8:
            _check(path, key, arr, "uint8", (None, *IMAGE_SHAPE))
        elif key.startswith("x_"):
            _check(path, key, arr, "float32", (None, *IMAGE_SHAPE))
            if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
                raise ContractError(f"{path}: array '{key}' must hold pixels in [0, 1]")
        else:
            _check(path, key, arr, "uint8", (None,))
            _check_labels(path, key, arr)
    _check_pairs(path, arrays, PROCESSED_SPLITS)
    return {key: arrays[key] for key in processed_keys()}


def load_processed(path: Path, levels: bool = False) -> dict[str, np.ndarray]:
    """The processed splits, checked. With `levels`, each image array whose pixels are all exact
    levels / 255 (what `normalize` writes) is returned as those uint8 levels -- 47 MB instead of
    188 MB for the training images, and never whole as float32 while loading; `as_pixels` gives
    back the identical float32 values. Other image arrays are returned as float32."""
    path = Path(path)
    keys = processed_keys()
    as_levels = tuple(key for key in keys if levels and key.startswith("x_"))
    return check_processed(path, _read_npz(path, keys, as_levels), levels=levels)


def save_processed(path: Path, arrays: dict[str, np.ndarray]) -> None:
    check_processed(path, arrays)
    write_npz(path, {key: arrays[key] for key in processed_keys()})


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"{path}: file not found") from None
    except (OSError, ValueError) as err:
        raise ContractError(f"{path}: not a readable JSON file ({one_line(err)})") from None
