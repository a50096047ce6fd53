"""Training across hosts: two network namespaces (tests/netlab.py) train one model with
TensorFlow's MultiWorkerMirroredStrategy, as docs/team.md launches it -- `TF_CONFIG=… dvc repro`
on the chief, `TF_CONFIG=… make worker` (the train stage's command) on the other host.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import netlab
from conftest import LEARNS, REPO, make_project, run, stages_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_problem = netlab.unavailable()
if _problem and not os.environ.get(netlab.REQUIRE_ENV):
    pytest.skip(_problem, allow_module_level=True)

PORT = 23456
# 20 epochs on the tiny task: past its noisy first epochs (as tests/test_distribute.py).
EPOCHS = 20
# Two hosts take batch_size images each per step: twice the global batch of one host, half the
# steps. On 30 validation images the models may differ by an image or so, never by more than this
# (the tolerance tests/test_distribute.py allows two devices of one host).
TOLERANCE = 0.05
# What `make worker` runs after `dvc repro normalize`: the train stage's own command.
WORKER_CMD = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"])


def tf_config(hosts: list[netlab.Host], index: int) -> str:
    cluster = {"worker": [f"{host.address}:{PORT}" for host in hosts]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


@pytest.fixture
def lab():
    if _problem:
        raise AssertionError(_problem)
    with netlab.Lab.create() as lab:
        hosts = [lab.host("chief"), lab.host("worker")]
        lab.wait_reachable()
        yield hosts


def two_copies(tmp_path: Path, epochs: int) -> list[tuple[Path, dict[str, str]]]:
    """The same project (params, data) on each host, its data prepared."""
    copies = []
    for name in ("chief", "worker"):
        root, env = make_project(tmp_path / name, **{**LEARNS, "train__epochs": epochs})
        copies.append((root, env))
    return copies


def only_run(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lstm")
    return client.search_runs([experiment.experiment_id])


def test_two_hosts_train_one_model_within_tolerance_of_one_host(lab, tmp_path):
    (chief_root, chief_env), (worker_root, worker_env) = two_copies(tmp_path, EPOCHS)
    run(["dvc", "repro", "normalize"], worker_root, worker_env)
    worker_log = (tmp_path / "worker.log").open("w+")
    worker = lab[1].popen(
        WORKER_CMD,
        cwd=worker_root,
        env={**worker_env, "TF_CONFIG": tf_config(lab, 1)},
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    chief = lab[0].run(
        ["dvc", "repro"],
        cwd=chief_root,
        env={**chief_env, "TF_CONFIG": tf_config(lab, 0)},
        timeout=600,
    )
    assert chief.returncode == 0, chief.stdout + chief.stderr
    assert worker.wait(timeout=120) == 0
    worker_log.seek(0)
    said = worker_log.read()
    assert f"train: host 1 ({lab[1].address}:{PORT}), {EPOCHS} epochs done" in said, said
    assert "epochs on 2 device(s) across 2 hosts" in chief.stdout
    # The worker wrote nothing: no model, no history, its dvc.lock without a train stage.
    assert not (worker_root / "models").exists()
    assert "train" not in yaml.safe_load((worker_root / "dvc.lock").read_text())["stages"]
    (logged,) = only_run(chief_root)
    assert logged.data.tags["train.cluster_size"] == "2"
    assert logged.data.tags["train.replicas"] == "2"
    assert logged.data.tags["train.global_batch_size"] == str(2 * LEARNS["train__batch_size"])
    assert logged.info.status == "FINISHED"

    # The same project on one host.
    alone_root, alone_env = make_project(tmp_path / "alone", **{**LEARNS, "train__epochs": EPOCHS})
    run(["dvc", "repro"], alone_root, alone_env)
    two = json.loads((chief_root / "reports" / "metrics.json").read_text())
    one = json.loads((alone_root / "reports" / "metrics.json").read_text())
    assert one["val_accuracy"] >= 0.9  # a comparison between models that learned
    for metric in ("val_accuracy", "holdout_accuracy"):
        assert two[metric] == pytest.approx(one[metric], abs=TOLERANCE), (metric, one, two)
    # And the chief's outputs are an ordinary pipeline's: nothing left to run.
    assert stages_run(run(["dvc", "repro"], chief_root, chief_env)) == []


def test_a_killed_host_fails_the_other_in_bounded_time_with_one_line(lab, tmp_path):
    (chief_root, chief_env), (worker_root, worker_env) = two_copies(tmp_path, epochs=500)
    run(["dvc", "repro", "normalize"], worker_root, worker_env)
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = lab[1].popen(
            WORKER_CMD,
            cwd=worker_root,
            env={**worker_env, "TF_CONFIG": tf_config(lab, 1)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    chief = lab[0].popen(
        ["dvc", "repro"],
        cwd=chief_root,
        env={**chief_env, "TF_CONFIG": tf_config(lab, 0)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while "Epoch 3/" not in worker_log.read_text():
        assert time.monotonic() < deadline and chief.poll() is None, worker_log.read_text()
        time.sleep(0.5)
    os.killpg(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    out, err = chief.communicate(timeout=180)
    took = time.monotonic() - killed

    assert chief.returncode != 0
    # TensorFlow's heartbeat timeout is 10 s; the bound leaves room for a slow machine.
    assert took < 60, took
    (line,) = [line for line in err.splitlines() if line.startswith("error: training across")]
    assert f"host 1 ({lab[1].address}:{PORT})" in line and "start train again" in line, line
    assert "Traceback" not in out + err
    # Nothing of train's was written; its run ended FAILED.
    assert not (chief_root / "models" / "model.keras").exists()
    assert "train" not in yaml.safe_load((chief_root / "dvc.lock").read_text())["stages"]
    (logged,) = only_run(chief_root)
    assert logged.info.status == "FAILED"
