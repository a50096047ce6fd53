"""The fused op is optional: where it cannot be built or loaded, installing and training go on with
Keras' LSTM and say so in one line; a library built from another source is never loaded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_project, run, stages_run, without_compiler
from mnist_lstm import onednn_build, onednn_lstm

# Not in the fast tier (`make test`); `make test-all` runs them (docs/testing.md).
pytestmark = pytest.mark.slow

needs_onednn_wheel = pytest.mark.skipif(
    onednn_build.platform_problem() is not None
    or not (Path(sys.prefix) / "lib" / "libdnnl.so").exists(),
    reason="the oneDNN wheel exists for Linux x86-64 only",
)


@pytest.fixture
def hidden_op(tmp_path, monkeypatch) -> Path:
    """No op library where training looks for one, and no compiler to build one."""
    folder = tmp_path / "op"
    folder.mkdir()
    monkeypatch.setenv(onednn_build.OP_DIR_ENV, str(folder))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("CXX", raising=False)
    onednn_lstm.ops.cache_clear()
    yield folder
    onednn_lstm.ops.cache_clear()


def install_step(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_lstm.onednn_build", *args],
        env=env,
        capture_output=True,
        text=True,
    )


def test_auto_falls_back_to_keras_and_says_why_and_what_it_costs(hidden_op):
    kernel, why = onednn_lstm.choose_kernel("auto")
    assert kernel == "keras"
    assert "\n" not in why
    assert "oneDNN LSTM op is not built" in why or "Linux x86-64 only" in why
    assert "slower per epoch" in why
    assert onednn_lstm.choose_kernel("keras") == ("keras", "train.lstm_kernel: keras")


def test_onednn_insists_and_fails_in_one_line_naming_the_way_out(hidden_op):
    with pytest.raises(onednn_build.OpUnavailable) as caught:
        onednn_lstm.choose_kernel("onednn")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train.lstm_kernel: onednn, but ")
    assert message.endswith("(or set train.lstm_kernel: auto)")


@pytest.mark.skipif(sys.platform == "win32", reason=".ci/without-compiler is a POSIX shell script")
def test_install_without_a_compiler_skips_the_op_in_one_line_and_goes_on(tmp_path):
    env = {**os.environ, onednn_build.OP_DIR_ENV: str(tmp_path)}
    env.pop("CXX", None)
    result = subprocess.run(
        without_compiler([sys.executable, "-m", "mnist_lstm.onednn_build"]),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oneDNN LSTM op: skipped (")
    assert "slower per epoch" in lines[0] and "Installation goes on" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "onednn_lstm.so").exists()


@needs_onednn_wheel
def test_a_failed_compile_is_one_line_with_its_log_and_installation_goes_on(tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'onednn_lstm.cc:1: error: expected something' >&2\nexit 1\n")
    broken.chmod(0o755)
    env = {**os.environ, onednn_build.OP_DIR_ENV: str(tmp_path), "CXX": str(broken)}
    result = install_step(env)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    log = tmp_path / "build.log"
    assert result.stdout.strip() == (
        f"oneDNN LSTM op: skipped (compiling the oneDNN LSTM op failed (exit 1); see {log}); "
        f"{onednn_build.COST}. Installation goes on."
    )
    assert "expected something" in log.read_text()
    assert not (tmp_path / "onednn_lstm.so").exists()
    required = install_step(env, "--require")
    assert required.returncode == 1
    assert required.stderr.strip().splitlines() == [
        f"error: compiling the oneDNN LSTM op failed (exit 1); see {log}"
    ]


def stale_library(folder: Path) -> Path:
    """A library file whose embedded hash is some other source's."""
    path = folder / "onednn_lstm.so"
    path.write_bytes(b"\x7fELF..." + onednn_build.HASH_MARKER + b"0" * 64 + b"\0...")
    return path


def test_the_embedded_source_hash_is_read_back_from_the_library(tmp_path):
    path = stale_library(tmp_path)
    assert onednn_build.built_hash(path) == "0" * 64
    assert onednn_build.built_hash(tmp_path / "missing.so") is None


def test_a_library_built_from_another_source_is_refused_when_it_cannot_be_rebuilt(hidden_op):
    stale_library(hidden_op)
    if onednn_build.platform_problem():
        pytest.skip(onednn_build.platform_problem())
    with pytest.raises(onednn_build.OpUnavailable, match="was built from another onednn_lstm.cc"):
        onednn_build.current_library()
    kernel, why = onednn_lstm.choose_kernel("auto")
    assert kernel == "keras" and "was built from another onednn_lstm.cc" in why


@needs_onednn_wheel
def test_a_library_built_from_another_source_is_rebuilt_before_loading(tmp_path, monkeypatch):
    if onednn_build.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    monkeypatch.setenv(onednn_build.OP_DIR_ENV, str(tmp_path))
    path = stale_library(tmp_path)
    assert onednn_build.current_library() == path
    assert onednn_build.built_hash(path) == onednn_build.source_hash()
    assert path.stat().st_size > 100_000  # a real library replaced the stale bytes


@pytest.mark.e2e
@needs_onednn_wheel
def test_dvc_repro_after_an_edit_of_the_op_source_never_trains_with_the_old_build(tmp_path):
    if onednn_build.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    root, env = make_project(tmp_path / "project", train__lstm_kernel="onednn")
    env[onednn_build.OP_DIR_ENV] = str(tmp_path / "op")
    library = tmp_path / "op" / "onednn_lstm.so"
    source = root / "src" / "mnist_lstm" / "csrc" / "onednn_lstm.cc"
    run([sys.executable, "-m", "mnist_lstm.onednn_build"], root, env)  # as `make install` does
    run(["dvc", "repro"], root, env)

    source.write_text(source.read_text() + "// an edit\n")
    rerun = run(["dvc", "repro"], root, env)
    assert stages_run(rerun)[0] == "train"  # evaluate too, unless the model bytes are the same
    assert "oneDNN LSTM op: was built from another onednn_lstm.cc; compiling it" in rerun.stdout
    assert "train: LSTM kernel onednn (" in rerun.stdout
    assert onednn_build.built_hash(library) == hashlib.sha256(source.read_bytes()).hexdigest()

    # Without a compiler the next edit cannot be built: `onednn` refuses in one line, and
    # dvc.lock keeps the source and model of the last good run (its model is in DVC's cache).
    lock = (root / "dvc.lock").read_bytes()
    source.write_text(source.read_text() + "// another edit\n")
    refused = run(without_compiler(["dvc", "repro"]), root, env, check=False)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == (
        "error: train.lstm_kernel: onednn, but the oneDNN LSTM op was built from another "
        "onednn_lstm.cc and cannot be rebuilt: no C++ compiler on PATH (g++, c++ or clang++; "
        "or set CXX) (or set train.lstm_kernel: auto)"
    )
    assert "Traceback" not in refused.stdout + refused.stderr
    assert (root / "dvc.lock").read_bytes() == lock
    assert not (root / "models" / "model.keras").exists()  # no model from the old build


def test_a_library_that_does_not_load_falls_back_in_one_line(hidden_op, monkeypatch):
    """A library built from this source against another TensorFlow (the lock changed since)."""
    broken = hidden_op / "onednn_lstm.so"
    broken.write_bytes(b"not a shared object " + onednn_build.HASH_MARKER + b"0" * 64)
    monkeypatch.setattr(onednn_build, "source_hash", lambda source=None: "0" * 64)
    kernel, why = onednn_lstm.choose_kernel("auto")
    assert kernel == "keras" and "does not load" in why and "\n" not in why
    with pytest.raises(
        onednn_build.OpUnavailable, match="does not load.*`make install` rebuilds it"
    ):
        onednn_lstm.choose_kernel("onednn")
