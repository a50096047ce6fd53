"""A fresh store created by several processes at once (docs/troubleshooting.md): parallel `dvc exp`
workers, or two pipelines started together on a new clone, each open the store the stages' way
(`tracking.connect()`) before any of them has made its schema or the experiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

# Each process imports mlflow first, says so, then waits for the others: the race is in connect().
OPENER = """
import pathlib, sys, time
from mnist_lstm import tracking
print("ready", flush=True)
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
print("experiment", tracking.connect(), flush=True)
"""


# Real processes, each importing TensorFlow (about 30 s on 2 cores): `make test-all` runs it.
@pytest.mark.slow
def test_four_processes_creating_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    go = tmp_path / "go"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(go)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for opener in openers:
            assert opener.stdout.readline() == "ready\n", opener.communicate()[1]
        assert not db.exists()  # nobody has created it yet
        go.touch()
        outputs = [opener.communicate(timeout=120) for opener in openers]
    finally:
        for opener in openers:
            if opener.poll() is None:
                opener.kill()
                opener.wait()
    for opener, (out, err) in zip(openers, outputs):
        assert opener.returncode == 0, err
        assert "error" not in err.lower() and "Traceback" not in err, err
    ids = {line.split()[1] for out, _ in outputs for line in out.splitlines()}
    (experiment_id,) = ids
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    named = [e for e in client.search_experiments() if e.name == "mnist-lstm"]
    assert [e.experiment_id for e in named] == [experiment_id]
    assert Path(urlparse(named[0].artifact_location).path) == tmp_path / "mlartifacts"
