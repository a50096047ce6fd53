"""Tiny fake MNIST made on the spot: tests never download anything."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_lstm import onednn_build  # no TensorFlow: a tenth of a second

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as mnist_lstm sets it for users

REPO = Path(__file__).resolve().parents[1]


def make_tiny_raw(n_train: int = 120, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Raw arrays in Keras' layout; digit d is a bright band on rows 2d..2d+2 (learnable)."""
    rng = np.random.default_rng(seed)

    def images(labels: np.ndarray) -> np.ndarray:
        x = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            x[i, 2 * label : 2 * label + 3, 4:24] = 255
        return x

    y_train = np.arange(n_train, dtype=np.uint8) % 10
    y_test = np.arange(n_test, dtype=np.uint8) % 10
    return {
        "x_train": images(y_train),
        "y_train": y_train,
        "x_test": images(y_test),
        "y_test": y_test,
    }


@pytest.fixture
def tiny_raw() -> dict[str, np.ndarray]:
    return make_tiny_raw()


@pytest.fixture
def tiny_npz(tmp_path: Path, tiny_raw) -> Path:
    path = tmp_path / "tiny_mnist.npz"
    np.savez(path, **tiny_raw)
    return path


# Set by .ci/run: every skipped test is listed, with its reason, in this markdown file (printed
# at the end of the run and put in the GitHub job's summary), under the label
# $MNIST_LSTM_SKIP_LABEL; with MNIST_LSTM_NO_SKIPS=1 any skip fails the run (where CI installed
# every part a test needs, a skip can only mean a part that silently went missing).
SKIP_REPORT_ENV = "MNIST_LSTM_SKIP_REPORT"
NO_SKIPS_ENV = "MNIST_LSTM_NO_SKIPS"


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    path = os.environ.get(SKIP_REPORT_ENV)
    if path:
        label = os.environ.get("MNIST_LSTM_SKIP_LABEL", "pytest")
        rows = [
            f"| {label} | `{report.nodeid}` | {_skip_reason(report)} |".replace("\n", " ")
            for report in skipped
        ] or [f"| {label} | none | |"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        new = not Path(path).exists()
        with open(path, "a", encoding="utf-8") as out:
            if new:
                out.write("| run | skipped test | why |\n|---|---|---|\n")
            out.write("\n".join(rows) + "\n")
    if skipped and os.environ.get(NO_SKIPS_ENV) == "1":
        terminalreporter.write_line(
            f"error: {len(skipped)} test(s) skipped where {NO_SKIPS_ENV}=1 (CI installed every "
            "part they need): see the skip reasons above",
            red=True,
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and os.environ.get(NO_SKIPS_ENV) == "1" and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a params.yaml: the repo's defaults with `overrides` ({"train.epochs": 1}) applied."""

    def write(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        params = default_params()
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".")
            params[section][key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return write


BIN = Path(sys.executable).parent
# What a clone holds that the pipeline needs (outputs, caches and stores excluded).
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "src",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "README.md",
]


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_project(root: Path, **overrides) -> tuple[Path, dict[str, str]]:
    """A committed git+DVC copy of the repo whose params point at tiny data, 1 epoch, 16 units.

    Returns the copy and the environment to run `dvc` in: the project's venv first on PATH,
    the copy's own code on PYTHONPATH, and no MLFLOW_*/DVC_* variables from the caller.
    """
    for name in PROJECT_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(
                source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source, target)
    fixture = root / "fixtures" / "tiny_mnist.npz"
    fixture.parent.mkdir()
    np.savez(fixture, **make_tiny_raw(n_train=200, n_test=40))
    params = default_params()
    params["fetch"].update(source="path", path="fixtures/tiny_mnist.npz")
    params["train"].update(epochs=1, batch_size=32, units=16)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(root / "src"))
    run(["git", "init", "-q"], root, env)
    # The project's own identity: a fresh machine (a CI runner) has no global one, and `dvc exp`
    # commits through its own git backend, which reads only git config.
    run(["git", "config", "user.name", "mnist-lstm tests"], root, env)
    run(["git", "config", "user.email", "tests@mnist-lstm.invalid"], root, env)
    commit(root, env, "tiny project")
    return root, env


# A config that learns the tiny bands well within seconds, and gate rules sized for its 30
# validation images: for tests that need a model good enough to promote.
LEARNS = dict(
    train__optimizer="adam", train__learning_rate=0.02, train__epochs=10, train__batch_size=16
)
TINY_GATE = {
    "val_accuracy": {"better": "higher", "limit": 0.5, "max_regression": 0.05},
    "val_loss": {"better": "lower", "limit": None, "max_regression": 0.5},
}


def make_promotable_project(root: Path) -> tuple[Path, dict[str, str]]:
    root, env = make_project(root, **LEARNS)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"] = TINY_GATE
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(root, env, "gate sized for tiny data")
    return root, env


def commit(root: Path, env: dict[str, str], message: str) -> None:
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], root, env)


def locked_model_md5(root: Path) -> str:
    """The model file's md5 as the project's dvc.lock records it."""
    from mnist_lstm.lineage import locked_hashes
    from mnist_lstm.tracking import TAG_MODEL_MD5

    return locked_hashes(yaml.safe_load((root / "dvc.lock").read_text()))[TAG_MODEL_MD5]


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` actually executed, in order."""
    return re.findall(r"^Running stage '([^']+)':", result.stdout, re.MULTILINE)


@contextlib.contextmanager
def edited(path: Path, old: str, new: str):
    """`path` with its first `old` replaced by `new` inside the block; restored afterwards."""
    original = path.read_text()
    assert old in original
    path.write_text(original.replace(old, new, 1))
    try:
        yield
    finally:
        path.write_text(original)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_service(cmd: list[str], cwd: Path, env: dict[str, str], ready_url: str):
    """A server process (mlflow ui, mlflow models serve) for the block: yields once `ready_url`
    answers, and stops it with its children afterwards."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            for _ in range(240):
                if process.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"{cmd} exited ({process.returncode}):\n{log.read()}")
                try:
                    urllib.request.urlopen(ready_url, timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                raise AssertionError(f"{ready_url} did not answer within 2 minutes")
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def fused_op_problem() -> str | None:
    """Why the oneDNN op cannot be used in this environment (None: it can, built from the current
    source by `make install`; training never builds it)."""
    from mnist_lstm import onednn_lstm

    try:
        onednn_lstm.ops()
    except onednn_build.OpUnavailable as err:
        return str(err)
    return None


# Set by CI (.ci/run, tools/arm-check, the GitHub workflow): the kernel `train.lstm_kernel: auto`
# must pick there. The tests then assert it, not what the code picks: an op that failed to build
# or load where CI expects it fails the e2e tests instead of passing them with Keras' LSTM.
EXPECT_KERNEL_ENV = onednn_build.EXPECT_KERNEL_ENV


def expected_kernel() -> str:
    """The kernel `train.lstm_kernel: auto` must pick here: $MNIST_LSTM_EXPECT_KERNEL when set,
    else what this environment offers."""
    stated = os.environ.get(EXPECT_KERNEL_ENV)
    if stated:
        if stated not in ("keras", "onednn"):
            raise pytest.UsageError(f"{EXPECT_KERNEL_ENV}={stated!r}: expected keras or onednn")
        return stated
    return "keras" if fused_op_problem() else "onednn"


@pytest.fixture
def fused_op() -> None:
    """For tests of the op itself: skipped, with the reason, where it is unavailable -- unless CI
    states the op is expected here ($MNIST_LSTM_EXPECT_KERNEL=onednn): then a failure."""
    problem = fused_op_problem()
    if problem and os.environ.get(EXPECT_KERNEL_ENV) == "onednn":
        pytest.fail(f"{EXPECT_KERNEL_ENV}=onednn but the oneDNN op is unavailable: {problem}")
    if problem:
        pytest.skip(f"the oneDNN op is unavailable here: {problem}")


CI_DIR = REPO / ".ci"


def without_compiler(cmd: list[str]) -> list[str]:
    """`cmd` run with no C/C++ compiler on PATH (.ci/without-compiler)."""
    return [str(CI_DIR / "without-compiler"), *cmd]


def invoke(port: int, x: np.ndarray) -> np.ndarray:
    """The logits `make serve` on 127.0.0.1:`port` answers for images `x` (POST /invocations)."""
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps({"inputs": x.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.array(json.load(response)["predictions"])
