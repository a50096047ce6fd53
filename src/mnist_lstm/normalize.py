"""Stage `normalize`: raw uint8 MNIST -> float32 splits for training, validation and the holdout.

Reads params `normalize.holdout_size` and the raw `.npz`; writes the processed `.npz` (see
contracts.py). dvc.yaml: `python -m mnist_lstm.normalize --params params.yaml
--raw data/raw/mnist.npz --out data/processed/mnist.npz`.

As in the tutorial: train is every training image; validation is the test set without its last
`holdout_size` images; the holdout is those last images.
"""

from __future__ import annotations

import sys

import numpy as np

from mnist_lstm import contracts
from mnist_lstm.errors import exits_cleanly
from mnist_lstm.params import ParamsError, load_params


def normalize_images(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1]; each image stays 28 timesteps x 28 features.

    The one formula lives in contracts: `train` holds the images as levels and converts each
    batch with it, which gives the bytes this stage wrote."""
    return contracts.pixels_from_levels(x)


def split(raw: dict[str, np.ndarray], holdout_size: int) -> dict[str, np.ndarray]:
    """The tutorial's three splits, pixels scaled to [0, 1]."""
    n_test = len(raw["x_test"])
    if holdout_size >= n_test:
        raise ParamsError(
            f"normalize.holdout_size must leave validation images: got {holdout_size}, "
            f"but the test set has only {n_test} images (allowed: 1..{n_test - 1})"
        )
    cut = n_test - holdout_size
    return {
        "x_train": normalize_images(raw["x_train"]),
        "y_train": raw["y_train"],
        "x_val": normalize_images(raw["x_test"][:cut]),
        "y_val": raw["y_test"][:cut],
        "x_holdout": normalize_images(raw["x_test"][cut:]),
        "y_holdout": raw["y_test"][cut:],
    }


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = contracts.stage_arguments(__doc__, argv, "raw", "out")
    (params,) = load_params(args.params, "normalize")
    processed = split(contracts.load_raw(args.raw), params.holdout_size)
    contracts.save_processed(args.out, processed)
    counts = ", ".join(
        f"{name} {len(processed['y_' + name])}" for name in contracts.PROCESSED_SPLITS
    )
    print(f"normalize: {args.raw} -> {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
