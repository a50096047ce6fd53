"""The fused op is optional: where it cannot be built or loaded, installing and training go on with
Keras' LSTM and say so in one line; a library built from another source is never loaded, and only
`make install` (`python -m mnist_lstm.onednn_build`) ever compiles it -- training never does."""

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


@pytest.fixture
def compilers_that_tell(tmp_path, monkeypatch) -> Path:
    """Every C++ compiler the build could pick ($CXX, then g++, c++, clang++ first on PATH) is a
    script that leaves a marker file and fails: the marker exists iff something compiled."""
    marker = tmp_path / "a-compiler-ran"
    folder = tmp_path / "telltale-bin"
    folder.mkdir()
    for name in (*onednn_build.COMPILERS, "telltale-cxx"):
        script = folder / name
        script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> '{marker}'\nexit 1\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CXX", str(folder / "telltale-cxx"))
    return marker


@pytest.fixture
def stale_op(tmp_path, monkeypatch, compilers_that_tell) -> Path:
    """A library built from another source where training looks for one, with a compiler at hand
    (one that tells when it runs)."""
    if onednn_build.platform_problem():
        pytest.skip(onednn_build.platform_problem())
    folder = tmp_path / "op"
    folder.mkdir()
    monkeypatch.setenv(onednn_build.OP_DIR_ENV, str(folder))
    onednn_lstm.ops.cache_clear()
    yield stale_library(folder)
    onednn_lstm.ops.cache_clear()


STALE = (
    "the oneDNN LSTM op is stale (built from another onednn_lstm.cc); `make install` rebuilds it"
)


def install_step(
    env: dict[str, str], *args: str, expect: str | None = None
) -> subprocess.CompletedProcess:
    """`make install`'s op step as a user runs it; `expect` is the kernel CI states, if any."""
    env = {k: v for k, v in env.items() if k != onednn_build.EXPECT_KERNEL_ENV}
    if expect:
        env[onednn_build.EXPECT_KERNEL_ENV] = expect
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
    # No compiler either: the line says that `make install` cannot build it here, and why.
    assert (
        "the oneDNN LSTM op is missing (not built); `make install` cannot build it here: "
        "no C++ compiler on PATH"
        in why
        or "Linux x86-64 only" in why
    )
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
    env.pop(onednn_build.EXPECT_KERNEL_ENV, None)
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
    # CI states the op is expected (.ci/run): the same failed build fails `make install`.
    expected = install_step(env, expect="onednn")
    assert expected.returncode == 1
    assert expected.stderr.strip().splitlines() == [
        f"error: compiling the oneDNN LSTM op failed (exit 1); see {log} "
        f"({onednn_build.EXPECT_KERNEL_ENV}=onednn: the op is required)"
    ]
    # Where CI expects Keras' LSTM (no compiler, ARM), the skip stays a skip.
    keras = install_step(env, expect="keras")
    assert keras.returncode == 0 and "skipped" in keras.stdout


def stale_library(folder: Path) -> Path:
    """A library file whose embedded hash is some other source's."""
    path = folder / "onednn_lstm.so"
    path.write_bytes(b"\x7fELF..." + onednn_build.HASH_MARKER + b"0" * 64 + b"\0...")
    return path


def test_the_embedded_source_hash_is_read_back_from_the_library(tmp_path):
    path = stale_library(tmp_path)
    assert onednn_build.built_hash(path) == "0" * 64
    assert onednn_build.built_hash(tmp_path / "missing.so") is None


def unchanged(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_stale_library_trains_with_keras_under_auto_and_nothing_compiles(
    stale_op, compilers_that_tell
):
    before = unchanged(stale_op)
    with pytest.raises(onednn_build.OpUnavailable) as caught:
        onednn_build.current_library()
    assert str(caught.value) == STALE
    kernel, why = onednn_lstm.choose_kernel("auto")
    assert kernel == "keras"
    assert why == (
        f"train.lstm_kernel: auto, and the oneDNN op is unusable: {STALE}; {onednn_build.COST}"
    )
    assert not compilers_that_tell.exists()  # no compiler ran...
    assert unchanged(stale_op) == before  # ...and the library was not touched


def test_a_stale_library_under_onednn_refuses_in_one_line_naming_make_install(
    stale_op, compilers_that_tell
):
    before = unchanged(stale_op)
    with pytest.raises(onednn_build.OpUnavailable) as caught:
        onednn_lstm.choose_kernel("onednn")
    assert str(caught.value) == (
        f"train.lstm_kernel: onednn, but {STALE} (or set train.lstm_kernel: auto)"
    )
    assert not compilers_that_tell.exists()
    assert unchanged(stale_op) == before


@needs_onednn_wheel
def test_the_install_step_rebuilds_a_stale_library(tmp_path):
    """What `make install` runs: the one place the op is compiled."""
    if onednn_build.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    path = stale_library(tmp_path)
    result = install_step({**os.environ, onednn_build.OP_DIR_ENV: str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"oneDNN LSTM op: built {path} (it was built from another onednn_lstm.cc)"
    )
    assert onednn_build.built_hash(path) == onednn_build.source_hash()
    assert path.stat().st_size > 100_000  # a real library replaced the stale bytes
    again = install_step({**os.environ, onednn_build.OP_DIR_ENV: str(tmp_path)})
    assert again.stdout.strip() == f"oneDNN LSTM op: up to date ({path})"


@pytest.mark.e2e
@needs_onednn_wheel
def test_dvc_repro_after_an_edit_of_the_op_source_never_trains_with_the_old_build(tmp_path):
    if onednn_build.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    root, env = make_project(tmp_path / "project", train__lstm_kernel="onednn")
    env[onednn_build.OP_DIR_ENV] = str(tmp_path / "op")
    library = tmp_path / "op" / "onednn_lstm.so"
    source = root / "src" / "mnist_lstm" / "csrc" / "onednn_lstm.cc"
    install = [sys.executable, "-m", "mnist_lstm.onednn_build"]  # as `make install` runs it
    run(install, root, env)
    run(["dvc", "repro"], root, env)

    # The stage never compiles: after an edit `onednn` refuses in one line naming `make install`
    # (with a compiler at hand), and dvc.lock keeps the source and model of the last good run.
    lock = (root / "dvc.lock").read_bytes()
    built = library.read_bytes()
    source.write_text(source.read_text() + "// an edit\n")
    refused = run(["dvc", "repro"], root, env, check=False)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == (
        "error: train.lstm_kernel: onednn, but the oneDNN LSTM op is stale (built from another "
        "onednn_lstm.cc); `make install` rebuilds it (or set train.lstm_kernel: auto)"
    )
    assert "Traceback" not in refused.stdout + refused.stderr
    assert (root / "dvc.lock").read_bytes() == lock
    assert library.read_bytes() == built
    assert not (root / "models" / "model.keras").exists()  # no model from the old build

    # `make install` rebuilds it, and the next run trains through the op built from the edit.
    rebuilt = run(install, root, env)
    assert "(it was built from another onednn_lstm.cc)" in rebuilt.stdout
    rerun = run(["dvc", "repro"], root, env)
    assert stages_run(rerun)[0] == "train"
    assert "train: LSTM kernel onednn (" in rerun.stdout
    assert onednn_build.built_hash(library) == hashlib.sha256(source.read_bytes()).hexdigest()


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
