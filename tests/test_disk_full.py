"""A disk that fills up: on a real tmpfs of a few pages, the spool and the stages' outputs fail
in one line and leave nothing half-written; the stage itself is the real `python -m
mnist_lstm.train`."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import default_params, make_tiny_raw
from mnist_lstm import contracts
from mnist_lstm.normalize import split
from mnist_lstm.tracking import spool

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="mounts a tmpfs of a chosen size: Linux, as root",
)


@pytest.fixture
def small_disk():
    """mount(path, size): a tmpfs of `size` at `path`, unmounted after the test."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], check=True)  # a process still in it


def fill(disk: Path) -> Path:
    """Write zeros on `disk` until it is full; the filler file (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return filler


def metrics_op(step: int, n: int = 1) -> dict:
    metrics = {f"m{i}": 0.5 for i in range(n)}
    return {"op": "metrics", "metrics": metrics, "step": step, "timestamp": 1}


def test_a_full_disk_while_spooling_is_one_error_and_leaves_the_spool_as_it_was(
    tmp_path, small_disk
):
    disk = small_disk(tmp_path / "disk", "256k")
    s = spool.Spool.create(disk, "http://store", "run1")
    for step in range(3):
        s.append(metrics_op(step))
    before = (s.path / "ops.jsonl").read_bytes()
    model = tmp_path / "model.keras"
    model.write_bytes(os.urandom(64 * 1024))
    filler = fill(disk)

    with pytest.raises(spool.SpoolError) as copying:
        s.append({"op": "model"}, [(model, "model.keras")])
    # A line longer than what is left of its page: the first part lands, then the disk is full.
    with pytest.raises(spool.SpoolError) as appending:
        s.append(metrics_op(3, n=800))

    copy = s.path / "files" / "4" / "model.keras"
    for err, path in ((copying, copy), (appending, s.path / "ops.jsonl")):
        message = str(err.value)
        assert message.startswith(f"tracking spool: cannot write {path}: the disk is full")
        assert "free space on that disk and rerun the stage" in message and "\n" not in message
    assert not (s.path / "files" / "4").exists()  # the failed op's copies are gone
    assert (s.path / "ops.jsonl").read_bytes() == before  # and no half line is left behind

    filler.unlink()  # space again: the spool goes on where it was, in order
    s.append(metrics_op(3))
    assert [op["seq"] for op in spool.Spool(s.path).ops()] == [1, 2, 3, 4]


def test_a_run_whose_spool_fills_up_fails_with_the_first_error_alone(
    tmp_path, small_disk, monkeypatch, capsys
):
    """The stage's error is the one that says what happened: ending the run FAILED on the same
    full disk must neither raise a second error nor print more."""
    from mnist_lstm.tracking.outage import RunWriter

    disk = small_disk(tmp_path / "disk", "64k")
    monkeypatch.chdir(disk)
    monkeypatch.setenv("MNIST_LSTM_TRACKING", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted
    s = spool.Spool.create(disk, "http://127.0.0.1:9", "run1")
    run = RunWriter("run1", s)
    # An op that ends ops.jsonl at a page boundary: any later line needs a page, and none is left.
    line = len(json.dumps({**metrics_op(0), "seq": 1, "files": []}, sort_keys=True)) + 1
    pad = {"op": "metrics", "metrics": {"m" * (mmap.PAGESIZE - line + 2): 0.5}}
    s.append({**metrics_op(0), **pad})
    assert (s.path / "ops.jsonl").stat().st_size == mmap.PAGESIZE
    fill(disk)
    with pytest.raises(spool.SpoolError):
        run.log_metrics({"loss": 0.5}, step=1)
    run.end("FAILED")  # fails the same way, and says nothing: the error above is the one
    run.close()
    assert capsys.readouterr().out == ""
    assert [op["op"] for op in spool.Spool(s.path).ops()] == ["metrics"]
    assert not s.writer_alive()  # released: `make sync` may send what is there


def test_a_full_disk_never_leaves_a_half_written_output(tmp_path, small_disk, tiny_raw):
    disk = small_disk(tmp_path / "data", "64k")
    path = disk / "processed.npz"
    path.write_bytes(b"the previous output")
    fill(disk)

    with pytest.raises(contracts.WriteError) as err:
        contracts.save_processed(path, split(tiny_raw, 10))

    assert str(err.value) == (
        f"cannot write {path}: the disk is full (No space left on device); free space there (or "
        "make it writable) and rerun the stage; the previous file, if any, is unchanged"
    )
    assert path.read_bytes() == b"the previous output"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "processed.npz"]  # no temp file


def train(root: Path, model: Path) -> subprocess.CompletedProcess:
    """The real train stage on tiny data, offline (every write goes to the spool), in `root`."""
    data = root / "processed.npz"
    contracts.save_processed(data, split(make_tiny_raw(), 10))
    params = default_params()
    params["train"].update(epochs=1, batch_size=32, units=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, MNIST_LSTM_TRACKING="offline", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "mnist_lstm.train", "--params", "params.yaml", "--data", str(data),
        "--model", str(model), "--history", str(model.with_name("history.csv")),
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_train_with_its_spool_on_a_full_disk_ends_in_one_line(tmp_path, small_disk):
    root = tmp_path / "project"
    # Room for the run's params, datasets and metrics, not for the model's copy (38 KB).
    aside = small_disk(root / spool.SPOOL_DIR, "32k")

    result = train(root, root / "models" / "model.keras")

    assert result.returncode == 1
    (spooled,) = [p for p in aside.iterdir() if (p / "run.json").is_file()]
    (line,) = error_lines(result)
    # The model's op number depends on how many system-metrics samples came before it.
    copy = re.fullmatch(
        rf"error: tracking spool: cannot write {re.escape(str(spooled))}/files/(\d+)/"
        r"model\.keras: the disk is full \(No space left on device\); free space on that disk "
        r"and rerun the stage \(what the spool held before stays for `make sync`\)",
        line,
    )
    assert copy, line
    assert " is behind" not in result.stdout
    readable = spool.Spool(spooled)
    # Up to the model, all there; then the end (FAILED) fitted in where the copy had been.
    ops = readable.ops()
    assert [op["op"] for op in ops][-2:] == ["metrics", "end"] and ops[-1]["status"] == "FAILED"
    assert (spooled / "ops.jsonl").read_bytes().endswith(b"\n")
    assert not (spooled / "files" / copy[1]).exists() and not readable.writer_alive()


@pytest.mark.slow
def test_train_with_its_model_on_a_full_disk_keeps_the_old_model(tmp_path, small_disk):
    root = tmp_path / "project"
    root.mkdir()
    models = small_disk(tmp_path / "models", "64k")
    model = models / "model.keras"
    model.write_bytes(b"the model of the last run")
    fill(models)

    result = train(root, model)

    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line == (
        f"error: cannot write {model}: the disk is full (No space left on device); free space "
        "there (or make it writable) and rerun the stage; the previous file, if any, is unchanged"
    )
    assert model.read_bytes() == b"the model of the last run"
    assert sorted(p.name for p in models.iterdir()) == ["filler", "model.keras"]
    # The run ended FAILED in the spool (on another disk), ready for `make sync`.
    (spooled,) = spool.pending(root)
    assert spooled.ops()[-1]["status"] == "FAILED"
