"""Predict the digit in image files: `python -m mnist_lstm.predict IMAGE... [--model URI]`.

Takes PNG/JPEG (anything Pillow reads) of any size and makes each look like an MNIST digit before
predicting: grayscale, a white digit on black (light backgrounds are inverted), cropped to the
digit, scaled so its longer side is 20 pixels and centred by its centre of mass in 28x28 -- how
the MNIST images themselves were made. Prints `FILE: DIGIT (confidence P)` per file. A file that
cannot be read gets one `error:` line and the others are still predicted; the exit status is 1
if any file failed.

The model: `--model` (default `models:/mnist-lstm@champion` from MLFLOW_TRACKING_URI or the repo's
store), or a local `.keras` file such as `models/model.keras`. An MLflow model is downloaded to a
temporary folder and checked there before it loads: a registered version whose Keras file's md5
is not the one recorded when it was registered is refused in one `error:` line.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_lstm.contracts import IMAGE_SHAPE
from mnist_lstm.errors import UserError, exits_cleanly, one_line

DEFAULT_MODEL = "models:/mnist-lstm@champion"
DIGIT_BOX = 20  # MNIST digits fit a 20x20 box inside the 28x28 frame


class ImageError(UserError):
    """One input file that cannot be turned into a digit image."""


def read_image(path: Path) -> np.ndarray:
    """The file as a float grayscale array in [0, 255]."""
    try:
        # Past Image.MAX_IMAGE_PIXELS Pillow warns and decodes anyway (past twice that it
        # refuses): a PNG of a few kB can hold 100 M pixels, gigabytes once decoded as floats.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.asarray(image.convert("L"), dtype=np.float32)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else one_line(err)
        raise ImageError(
            f"{path}: not decoded: {size} is more than Pillow decodes safely "
            f"({Image.MAX_IMAGE_PIXELS:,} at most: a decompression bomb?); scale it down first"
        ) from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{path}: not an image Pillow can read (expected PNG, JPEG, ...)"
        ) from None
    except OSError as err:
        raise ImageError(f"{path}: cannot read image ({one_line(err)})") from None


def to_mnist(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """A grayscale picture of one digit -> (28, 28) float32 in [0, 1], MNIST-style."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 127:  # dark ink on light paper: MNIST is the other way round
        gray, background = 255.0 - gray, 255.0 - background
    ink = np.clip(gray - background, 0, None)
    if ink.max() < 32:  # no stroke stands out from the background
        raise ImageError(f"{name}: no digit found (the image is nearly uniform)")
    ink /= ink.max()
    rows, cols = np.nonzero(ink > 0.2)
    digit = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(
        Image.fromarray((digit * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
        dtype=np.float32,
    )
    # Centre of mass at the frame's centre, as MNIST did (clamped so the digit stays inside).
    ys, xs = np.indices(small.shape)
    mass = small.sum()
    top = int(round(IMAGE_SHAPE[0] / 2 - (ys * small).sum() / mass))
    left = int(round(IMAGE_SHAPE[1] / 2 - (xs * small).sum() / mass))
    top = min(max(top, 0), IMAGE_SHAPE[0] - small.shape[0])
    left = min(max(left, 0), IMAGE_SHAPE[1] - small.shape[1])
    frame = np.zeros(IMAGE_SHAPE, np.float32)
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    return frame / 255.0


def load_model(ref: str):
    """A local `.keras` file as it is; an MLflow model downloaded and checked first (a registered
    version's bytes against the md5 recorded when it was registered)."""
    if Path(ref).suffix == ".keras":
        import keras

        if not Path(ref).is_file():
            raise UserError(f"{ref}: no such model file")
        return keras.models.load_model(ref)
    from mnist_lstm.tracking import models, refusals, registry

    with tempfile.TemporaryDirectory(prefix="mnist-lstm-predict-") as scratch, refusals():
        checked = registry.download_checked(ref, Path(scratch))
        if checked.version is None:
            print(
                f"note: {ref} is not a registered model version: no recorded md5 to check its "
                f"bytes against (md5 {checked.md5})",
                file=sys.stderr,
            )
        return models.load_keras_file(checked.folder, checked.label)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    args = parser.parse_args(argv)

    ready, failed = {}, 0
    for path in args.images:
        try:
            ready[path] = to_mnist(read_image(path), str(path))
        except ImageError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    if ready:
        import keras

        model = load_model(args.model)
        logits = model(np.stack(list(ready.values())), training=False)
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
        for path, p in zip(ready, probabilities):
            print(f"{path}: {int(p.argmax())} (confidence {p.max():.3f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
