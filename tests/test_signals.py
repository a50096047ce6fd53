"""SIGTERM (what `kill`, CI runners and supervisors send) to each stage while `dvc repro` runs it,
and to `dvc repro` itself, in a tiny project with the real dvc CLI: a non-zero exit without a
traceback, no output half-written, dvc.lock untouched, and the next `dvc repro` completes with
`dvc status` clean. (tests/test_reliability.py covers SIGTERM, SIGINT and kill -9 to the train
process outside DVC, and what the MLflow run records.)"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from conftest import commit, make_project, make_tiny_raw, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc"),
]

STAGE_OUTS = {
    "fetch": ["data/raw/mnist.npz", "data/raw/provenance.json"],
    "normalize": ["data/processed/mnist.npz"],
    "train": ["models/model.keras", "models/history.csv"],
    "evaluate": [
        "reports/metrics.json",
        "reports/per_class.csv",
        "reports/confusion_matrix.csv",
        "reports/holdout_predictions.csv",
        "reports/val_predictions.csv",
        "reports/confusion_matrix.png",
        "reports/training_curves.png",
    ],
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project after a committed `dvc repro`. 12,000 training images, not 200: writing
    the processed file then takes long enough to be caught in the middle of it."""
    root, env = make_project(tmp_path_factory.mktemp("signals"))
    np.savez(root / "fixtures" / "tiny_mnist.npz", **make_tiny_raw(n_train=12000, n_test=40))
    env["PYTHONUNBUFFERED"] = "1"
    run(["dvc", "repro"], root, env)
    commit(root, env, "baseline run")
    return root, env


@pytest.fixture(autouse=True)
def undone(project):
    """Each test's edit undone even when it fails, so the next test starts from the baseline."""
    yield
    root, env = project
    run(["git", "checkout", "--", "."], root, env)


def stage_process(repro: subprocess.Popen, stage: str, timeout: float = 120) -> psutil.Process:
    """The `python -m mnist_lstm.<stage>` process `dvc repro` started (under its shell)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert repro.poll() is None, f"dvc repro ended before {stage} started"
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(repro.pid).children(recursive=True):
                if f"mnist_lstm.{stage}" in child.cmdline():
                    return child
        time.sleep(0.01)
    raise AssertionError(f"{stage} did not start within {timeout} s")


def start_repro(root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["dvc", "repro"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: nothing is left behind if the test fails
    )


def read_until(repro: subprocess.Popen, prefix: str) -> str:
    """dvc repro's output up to and including the first line starting with `prefix`."""
    seen = []
    for line in repro.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    raise AssertionError(f"no line starting {prefix!r}:\n{''.join(seen)}")


def finish(repro: subprocess.Popen, before: str = "") -> str:
    try:
        out, _ = repro.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(repro.pid, signal.SIGKILL)
    return before + out


def assert_left_clean(root: Path, env: dict[str, str], output: str, stage: str) -> None:
    """What a user sees after the interrupted `dvc repro`: no traceback, the stage's outputs
    absent or whole, no temp files, dvc.lock unchanged."""
    assert "Traceback" not in output, output
    for name in STAGE_OUTS[stage]:
        assert_whole_or_absent(root / name)
        leftovers = list((root / name).parent.glob(f".{Path(name).name}.*"))
        assert not leftovers, f"temp files left: {leftovers}"
    diff = run(["git", "diff", "--exit-code", "dvc.lock"], root, env, check=False)
    assert diff.returncode == 0, diff.stdout


def assert_whole_or_absent(path: Path) -> None:
    from mnist_lstm import contracts

    if not path.exists():
        return
    if path.name == "mnist.npz":
        load = contracts.load_raw if path.parent.name == "raw" else contracts.load_processed
        load(path)
    elif path.suffix == ".json":
        contracts.read_json(path)
    elif path.suffix == ".csv":
        assert len(pd.read_csv(path)) > 0
    elif path.suffix == ".keras":
        import keras

        keras.models.load_model(path)
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.load()


def assert_next_repro_recovers(root: Path, env: dict[str, str]) -> None:
    """With the change that made the stage run undone, `dvc repro` completes; all is clean."""
    run(["git", "checkout", "--", "."], root, env)
    run(["dvc", "repro"], root, env)
    status = run(["dvc", "status"], root, env)
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    assert run(["git", "status", "--porcelain"], root, env).stdout == ""


def edit_params(root: Path, **changes: dict) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def sigterm(process: psutil.Process) -> None:
    process.send_signal(signal.SIGTERM)


def assert_stopped_cleanly_and_recovers(
    root: Path, env: dict[str, str], output: str, stage: str
) -> None:
    """The stage said it was interrupted, left nothing half-written, and the next repro works."""
    assert_left_clean(root, env, output, stage)
    assert "error: interrupted (SIGTERM)" in output, output
    assert_next_repro_recovers(root, env)


def interrupted(
    root: Path, env: dict[str, str], stage: str, when: Callable[[subprocess.Popen], str]
) -> tuple[str, psutil.Process]:
    """`dvc repro`, with SIGTERM sent to `stage`'s process once `when` returns (it gets the
    repro, returns the output it read): the whole output, and the stage's process."""
    repro = start_repro(root, env)
    try:
        before = when(repro)
        process = stage_process(repro, stage)
        sigterm(process)
    except BaseException:
        finish(repro)
        raise
    output = finish(repro, before)
    assert repro.returncode != 0
    assert f"ERROR: failed to reproduce '{stage}'" in output, output
    return output, process


def test_sigterm_to_fetch_during_a_stalled_download(project):
    root, env = project
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/mnist.npz"
        edit_params(root, fetch={"source": "keras", "url": url, "timeout_s": 600})

        held = []

        def downloading(repro: subprocess.Popen) -> str:
            server.settimeout(120)
            held.append(server.accept()[0])  # fetch has asked and waits for the answer
            return ""

        started = time.monotonic()
        try:
            output, _ = interrupted(root, env, "fetch", downloading)
        finally:
            for connection in held:
                connection.close()
    assert time.monotonic() - started < 60, "SIGTERM did not end a download waiting 600 s"
    assert_stopped_cleanly_and_recovers(root, env, output, "fetch")


def test_sigterm_to_normalize_while_it_writes_its_output(project):
    root, env = project
    edit_params(root, normalize={"holdout_size": 5})
    folder = root / "data" / "processed"

    def writing(repro: subprocess.Popen) -> str:
        deadline = time.monotonic() + 120
        while not list(folder.glob(".mnist.npz.*")):  # its temp file, being written
            assert repro.poll() is None and time.monotonic() < deadline, "normalize never wrote"
            time.sleep(0.001)
        return ""

    output, _ = interrupted(root, env, "normalize", writing)
    assert_stopped_cleanly_and_recovers(root, env, output, "normalize")


def test_sigterm_to_train_mid_fit(project):
    root, env = project
    edit_params(root, train={"epochs": 10000})
    output, _ = interrupted(root, env, "train", lambda repro: read_until(repro, "Epoch 2/"))
    assert_stopped_cleanly_and_recovers(root, env, output, "train")


def test_sigterm_to_evaluate_once_it_logs(project):
    root, env = project
    module = root / "src" / "mnist_lstm" / "evaluate.py"
    module.write_text(module.read_text() + "# a change: evaluate runs again\n")
    output, _ = interrupted(root, env, "evaluate", lambda r: read_until(r, "evaluate: logging to"))
    assert_stopped_cleanly_and_recovers(root, env, output, "evaluate")


def test_sigterm_to_dvc_repro_during_train(project):
    root, env = project
    edit_params(root, train={"epochs": 10000})
    repro = start_repro(root, env)
    try:
        before = read_until(repro, "Epoch 2/")
        train = stage_process(repro, "train")
        os.kill(repro.pid, signal.SIGTERM)  # `kill <pid of dvc repro>`
        repro.wait(timeout=60)
        _, orphaned = psutil.wait_procs([train], timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(repro.pid, signal.SIGKILL)  # its group: an orphaned stage too
    output = before + repro.stdout.read()
    assert repro.returncode != 0
    assert_left_clean(root, env, output, "train")
    assert_next_repro_recovers(root, env)
    # DVC dies at once (no SIGTERM handler) and passes nothing on, and the shell between it and
    # the stage waits on: the stage sees its dvc gone (errors.watch_dvc) and ends as on its own
    # SIGTERM, instead of training on, reparented, to write and log behind DVC's back.
    assert not orphaned, "the train stage trained on 30 s after `dvc repro` got SIGTERM"
    assert (
        f"error: interrupted (SIGTERM: dvc (pid {repro.pid}), which ran this stage, ended); "
        "no output was written" in output
    ), output
