"""The predict CLI: any-size PNG/JPEG -> an MNIST-looking 28x28 image -> digit and confidence."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mnist_lstm.predict import ImageError, main, to_mnist


def mnist_like_seven() -> np.ndarray:
    """A 28x28 '7' in [0, 1], white on black (not centred the MNIST way: to_mnist does that)."""
    x = np.zeros((28, 28), np.float32)
    x[5:8, 6:24] = 1.0  # the bar
    for row in range(8, 24):  # the stem, leaning left as it goes down
        col = 22 - (row - 8) // 2
        x[row, col - 1 : col + 2] = 1.0
    return x


def as_photo(digit: np.ndarray, size: int, light_paper: bool) -> Image.Image:
    """The digit as a person's picture would be: big, maybe dark ink on white, off-centre."""
    big = np.asarray(
        Image.fromarray((digit * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    )
    canvas = np.zeros((size + 60, size + 20), np.uint8)
    canvas[50 : 50 + size, 5 : 5 + size] = big
    return Image.fromarray(255 - canvas if light_paper else canvas)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("light_paper", [False, True])
def test_a_big_off_centre_picture_becomes_the_mnist_image_it_came_from(light_paper):
    digit = mnist_like_seven()
    gray = np.asarray(as_photo(digit, 280, light_paper), dtype=np.float32)
    x = to_mnist(gray)
    assert x.shape == (28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and 0.9 < x.max() <= 1.0
    # MNIST's framing: the digit's longer side is 20 pixels, its centre of mass the centre.
    rows, cols = np.nonzero(x > 0.2)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 in (19, 20, 21)
    ys, xs = np.indices(x.shape)
    assert abs((ys * x).sum() / x.sum() - 14) <= 1 and abs((xs * x).sum() / x.sum() - 14) <= 1
    # The same picture as the small original gets (white on black, whatever the paper was).
    assert correlation(x, to_mnist(digit * 255)) > 0.9


def test_light_and_dark_paper_give_the_same_image():
    digit = mnist_like_seven()
    dark, light = (
        to_mnist(np.asarray(as_photo(digit, 150, paper), dtype=np.float32))
        for paper in (False, True)
    )
    np.testing.assert_allclose(dark, light, atol=1e-6)


def test_a_blank_picture_is_refused():
    with pytest.raises(ImageError, match="no digit found"):
        to_mnist(np.full((40, 40), 200, np.float32), "blank.png")


@pytest.fixture
def model_file(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.LSTM(8), keras.layers.Dense(10)])
    path = tmp_path / "model.keras"
    model.save(path)
    return path, model


def test_cli_predicts_each_good_file_and_reports_each_bad_one(tmp_path, model_file, capsys):
    path, model = model_file
    good_png, good_jpg = tmp_path / "seven.png", tmp_path / "seven.jpg"
    as_photo(mnist_like_seven(), 200, light_paper=True).save(good_png)
    as_photo(mnist_like_seven(), 90, light_paper=False).convert("RGB").save(good_jpg, quality=90)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    missing = tmp_path / "missing.png"

    status = main(
        [str(good_png), str(not_image), str(good_jpg), str(missing), "--model", str(path)]
    )

    out, err = capsys.readouterr()
    assert status == 1
    assert err.splitlines() == [
        f"error: {not_image}: not an image Pillow can read (expected PNG, JPEG, ...)",
        f"error: {missing}: no such file",
    ]
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(good_png), str(good_jpg)]
    for line, file in zip(lines, (good_png, good_jpg)):
        x = to_mnist(np.asarray(Image.open(file).convert("L"), dtype=np.float32))
        p = keras.ops.convert_to_numpy(keras.ops.softmax(model(x[None])))[0]
        assert line == f"{file}: {int(p.argmax())} (confidence {p.max():.3f})"


def rendered(
    digit: int,
    canvas: tuple[int, int],
    centre: tuple[float, float],
    font_size: int,
    stroke: int = 0,
    angle: float = 0.0,
    light_paper: bool = False,
) -> Image.Image:
    """`digit` typeset in Pillow's own font (bundled, so the same on every platform)."""
    image = Image.new("L", canvas, 0)
    font = ImageFont.load_default(size=font_size)
    ImageDraw.Draw(image).text(
        centre, str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, center=centre)
    return Image.eval(image, lambda v: 255 - v) if light_paper else image


def typeset_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """600 digits drawn straight into 28x28 frames, MNIST-sized (about 20 pixels tall) and near
    the centre -- never through `to_mnist` -- in three sizes, two weights, shifted and tilted."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for digit in range(10):
        for font_size in (22, 25, 28):
            for stroke in (0, 1):
                for _ in range(10):
                    dx, dy = rng.integers(-2, 3, size=2)
                    image = rendered(
                        digit, (28, 28), (14 + dx, 14 + dy), font_size, stroke, rng.uniform(-12, 12)
                    )
                    x.append(np.asarray(image, np.float32) / 255.0)
                    y.append(digit)
    return np.stack(x), np.array(y, np.uint8)


def test_a_model_trained_on_typeset_digits_reads_a_big_photo_of_each(tmp_path, write_params):
    """The whole path a user takes, with a model that has learnt something: the project's model,
    trained on small typeset digits, reads big, heavy, off-centre, dark-on-white pictures of
    digits it never saw through the CLI (`to_mnist` must frame them as MNIST does)."""
    from mnist_lstm.model import build_model, compile_model
    from mnist_lstm.params import load_params

    overrides = {"train.units": 32, "train.optimizer": "adam", "train.learning_rate": 0.01}
    (params,) = load_params(write_params({**overrides, "train.epochs": 15}), "train")
    x, y = typeset_digits()
    keras.utils.set_random_seed(0)
    model = compile_model(build_model(params), params, n_train=len(x))
    model.fit(x, y, batch_size=params.batch_size, epochs=params.epochs, verbose=0)
    model_file = tmp_path / "model.keras"
    model.save(model_file)

    pictures = []
    for digit in range(10):
        picture = tmp_path / f"digit-{digit}.png"
        rendered(
            digit,
            canvas=(240, 260),
            centre=(60 + 12 * digit, 150 - 6 * digit),  # off-centre, somewhere else each time
            font_size=140 + 10 * (digit % 3),
            stroke=3 + digit % 3,
            light_paper=True,
        ).save(picture)
        pictures.append(picture)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_lstm.predict",
            *map(str, pictures),
            "--model",
            str(model_file),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    said = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines())
    assert list(said) == list(map(str, pictures))
    read = [int(answer.split()[0]) for answer in said.values()]
    # 10 of 10 when measured; one slip is allowed to a tiny model, more means it reads nothing.
    assert sum(guess == digit for digit, guess in enumerate(read)) >= 9, read


def test_cli_with_a_missing_model_file_fails_with_one_line(tmp_path, capsys):
    png = tmp_path / "seven.png"
    as_photo(mnist_like_seven(), 60, light_paper=True).save(png)
    assert main([str(png), "--model", str(tmp_path / "nope.keras")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.keras'}: no such model file\n"


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid black 1-bit PNG of width x height pixels, a few hundred kB on disk at most."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits, all 0
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


# Pillow refuses to decode more than 2 x MAX_IMAGE_PIXELS (89 M) pixels and warns above it.
@pytest.mark.parametrize("side", [20000, 10000], ids=["past-the-limit", "warned"])
def test_a_decompression_bomb_is_refused_in_one_line_and_the_others_predicted(
    tmp_path, model_file, capsys, side
):
    path, _ = model_file
    bomb = bomb_png(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 1_000_000 and side * side > Image.MAX_IMAGE_PIXELS
    good = tmp_path / "seven.png"
    as_photo(mnist_like_seven(), 60, light_paper=True).save(good)

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        status = main([str(bomb), str(good), "--model", str(path)])

    out, err = capsys.readouterr()
    assert status == 1
    assert err.splitlines() == [
        f"error: {bomb}: not decoded: {side * side:,} pixels is more than Pillow decodes "
        f"safely ({Image.MAX_IMAGE_PIXELS:,} at most: a decompression bomb?); scale it down first"
    ]
    assert [line.split(":")[0] for line in out.splitlines()] == [str(good)]
    assert not [w for w in warned if issubclass(w.category, Image.DecompressionBombWarning)]
