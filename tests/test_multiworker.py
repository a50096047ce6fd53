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


def two_copies(
    tmp_path: Path,
    epochs: int,
    worker: dict | None = None,
    hosts: int = 2,
    both: dict | None = None,
) -> list[tuple[Path, dict[str, str]]]:
    """The same project (params, data, `both`'s params) on each host, `worker` params overriding
    the worker's; both log to one store (the chief's), so a run the worker logged would show."""
    copies = []
    for name, overrides in (("chief", {}), ("worker", worker or {})):
        params = {**LEARNS, "train__epochs": epochs, "train__hosts": hosts, **(both or {})}
        params.update(overrides)
        root, env = make_project(tmp_path / name, **params)
        copies.append((root, env))
    store = f"sqlite:///{copies[0][0] / 'mlflow.db'}"
    for _, env in copies:
        env["MLFLOW_TRACKING_URI"] = store
    return copies


def start_worker(lab, root: Path, env: dict[str, str], log: Path, **extra_env):
    """The worker's side as docs/team.md runs it: `dvc repro normalize`, then train's command."""
    run(["dvc", "repro", "normalize"], root, env)
    with log.open("w") as out:
        return lab[1].popen(
            WORKER_CMD,
            cwd=root,
            env={**env, "TF_CONFIG": tf_config(lab, 1), **extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_chief(lab, root: Path, env: dict[str, str], **output) -> subprocess.Popen:
    """The chief's side as docs/team.md runs it: `dvc repro` with its TF_CONFIG."""
    return lab[0].popen(
        ["dvc", "repro"], cwd=root, env={**env, "TF_CONFIG": tf_config(lab, 0)}, **output
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def only_run(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-lstm")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_two_hosts_train_one_model_within_tolerance_of_one_host(lab, tmp_path):
    # System metrics every second: each host takes a few samples while it trains.
    copies = two_copies(tmp_path, EPOCHS, both={"system_metrics__interval_s": 1})
    (chief_root, chief_env), (worker_root, worker_env) = copies
    worker = start_worker(lab, worker_root, worker_env, tmp_path / "worker.log")
    chief = lab[0].run(
        ["dvc", "repro"],
        cwd=chief_root,
        env={**chief_env, "TF_CONFIG": tf_config(lab, 0)},
        timeout=600,
    )
    assert chief.returncode == 0, chief.stdout + chief.stderr
    assert worker.wait(timeout=120) == 0
    said = (tmp_path / "worker.log").read_text()
    assert f"train: host 1 ({lab[1].address}:{PORT}), {EPOCHS} epochs done" in said, said
    assert "epochs on 2 device(s) across 2 hosts" in chief.stdout
    # The worker wrote nothing: no model, no history, its dvc.lock without a train stage.
    assert not (worker_root / "models").exists()
    assert "train" not in yaml.safe_load((worker_root / "dvc.lock").read_text())["stages"]
    # One run in the store both hosts were pointed at: the worker logged nothing.
    (logged,) = only_run(chief_root)
    assert logged.data.tags["train.cluster_size"] == "2"
    # The cluster's size is a param of the train stage: DVC's run-cache keys a two-host model
    # apart from a one-host one, so a restore never stands in for a cluster.
    assert (
        yaml.safe_load((chief_root / "dvc.lock").read_text())["stages"]["train"]["params"][
            "params.yaml"
        ]["train"]["hosts"]
        == 2
    )
    assert logged.data.params["train.hosts"] == "2"
    assert logged.data.tags["train.replicas"] == "2"
    assert logged.data.tags["train.global_batch_size"] == str(2 * LEARNS["train__batch_size"])
    assert logged.info.status == "FINISHED"
    # Each host's system metrics, under its own node id, in the chief's run: the chief's logged
    # live from the run's start, the worker's sampled while it fit and handed over when fit ended.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{chief_root / 'mlflow.db'}")
    run_id = logged.info.run_id
    epochs = sorted(m.timestamp for m in client.get_metric_history(run_id, "loss"))
    for node in ("host-0", "host-1"):
        for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            points = client.get_metric_history(run_id, f"system/{node}/{key}")
            assert sorted(p.step for p in points) == list(range(len(points))), (node, key)
            assert len(points) >= 2, (node, key, points)
    chief_points = client.get_metric_history(run_id, "system/host-0/cpu_utilization_percentage")
    assert logged.info.start_time <= min(p.timestamp for p in chief_points)
    worker_points = client.get_metric_history(run_id, "system/host-1/cpu_utilization_percentage")
    stamps = sorted(p.timestamp for p in worker_points)
    assert stamps[0] <= epochs[0] and epochs[0] <= stamps[-1] <= epochs[-1] + 10_000, stamps
    assert "system metrics" not in chief.stdout + said  # no sampler failed, no hand-over did

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
    worker_log = tmp_path / "worker.log"
    worker = start_worker(lab, worker_root, worker_env, worker_log)
    chief = start_chief(
        lab, chief_root, chief_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_epoch_3(worker_log, chief)
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


def wait_for_epoch_3(worker_log: Path, other: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while "Epoch 3/" not in worker_log.read_text():
        assert time.monotonic() < deadline and other.poll() is None, worker_log.read_text()
        time.sleep(0.5)


def test_a_killed_chief_stops_every_worker_in_bounded_time_writing_nothing(lab, tmp_path):
    (chief_root, chief_env), (worker_root, worker_env) = two_copies(tmp_path, epochs=500)
    worker_log = tmp_path / "worker.log"
    worker = start_worker(lab, worker_root, worker_env, worker_log)
    chief = start_chief(
        lab, chief_root, chief_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_epoch_3(worker_log, worker)
    os.killpg(chief.pid, signal.SIGKILL)
    killed = time.monotonic()
    code = worker.wait(timeout=180)
    took = time.monotonic() - killed

    said = worker_log.read_text()
    assert code != 0, said
    assert took < 60, took
    (line,) = error_lines(said)
    assert line.startswith("error: training across 2 hosts: ") and "start train again" in line
    assert f"host 0 ({lab[0].address}:{PORT})" in line, line
    assert "Traceback" not in said
    # The worker wrote nothing: no model, no history, no train stage in its dvc.lock.
    assert not (worker_root / "models").exists()
    assert "train" not in yaml.safe_load((worker_root / "dvc.lock").read_text())["stages"]


def both_hosts(lab, tmp_path: Path, copies, **extra_env) -> tuple[subprocess.Popen, str]:
    """The chief's `dvc repro` and the worker's stage, to their end: (chief, worker's output)."""
    (chief_root, chief_env), (worker_root, worker_env) = copies
    worker = start_worker(lab, worker_root, worker_env, tmp_path / "worker.log", **extra_env)
    chief = lab[0].run(
        ["dvc", "repro"],
        cwd=chief_root,
        env={**chief_env, "TF_CONFIG": tf_config(lab, 0), **extra_env},
        timeout=300,
    )
    assert worker.wait(timeout=120) != 0
    return chief, (tmp_path / "worker.log").read_text()


def test_hosts_with_different_params_both_stop_before_epoch_1_naming_host_and_key(lab, tmp_path):
    """The worker was given another learning rate (`-S` on one host): no host trains."""
    copies = two_copies(tmp_path, epochs=2, worker={"train__learning_rate": 0.5})
    chief, worker_said = both_hosts(lab, tmp_path, copies)

    assert chief.returncode != 0
    for said in (chief.stderr, worker_said):
        (line,) = error_lines(said)
        assert f"host 1 ({lab[1].address}:{PORT}) differs from the chief" in line, line
        assert "in train.learning_rate;" in line, line
        assert "Traceback" not in said and "Epoch 1/" not in said
    chief_root = copies[0][0]
    assert not (chief_root / "models").exists()
    assert only_run(chief_root) == []  # the run opens after the hosts agree


def test_a_cluster_of_hosts_whose_params_say_one_host_is_refused_on_every_host(lab, tmp_path):
    """train.hosts left at 1: the cluster's model would be cached as a one-host model."""
    copies = two_copies(tmp_path, epochs=2, hosts=1)
    chief, worker_said = both_hosts(lab, tmp_path, copies)

    assert chief.returncode != 0
    for said in (chief.stderr, worker_said):
        (line,) = error_lines(said)
        assert "train.hosts is 1 but TF_CONFIG names 2; set train.hosts: 2" in line, line


def test_a_host_whose_peers_never_come_gives_up_in_bounded_time_naming_them(lab, tmp_path):
    """The chief and the worker each alone (two clusters that never meet): both give up after
    MNIST_LSTM_CLUSTER_TIMEOUT with one line naming the other. TensorFlow alone would wait
    forever on the chief."""
    (chief_root, chief_env), (worker_root, worker_env) = two_copies(tmp_path, epochs=2)
    bound = {"MNIST_LSTM_CLUSTER_TIMEOUT": "15"}
    worker = start_worker(lab, worker_root, worker_env, tmp_path / "worker.log", **bound)
    started = time.monotonic()
    # The chief's cluster on other ports: the worker's leader (the chief at PORT) never answers,
    # nor does the chief's worker (at PORT + 1).
    lonely = {
        "cluster": {"worker": [f"{lab[0].address}:{PORT + 2}", f"{lab[1].address}:{PORT + 1}"]},
        "task": {"type": "worker", "index": 0},
    }
    chief = lab[0].run(
        ["dvc", "repro"],
        cwd=chief_root,
        env={**chief_env, "TF_CONFIG": json.dumps(lonely), **bound},
        timeout=300,
    )
    code = worker.wait(timeout=120)
    took = time.monotonic() - started

    assert chief.returncode != 0 and code != 0
    assert took < 90, took
    (line,) = error_lines(chief.stderr)
    assert f"host 1 ({lab[1].address}:{PORT + 1}) never came within 15 s" in line, line
    (line,) = error_lines((tmp_path / "worker.log").read_text())
    assert f"host 0 ({lab[0].address}:{PORT}) never came within 15 s" in line, line
    assert "run-cache" in line  # the chief may have had nothing to train
    assert not (chief_root / "models").exists() and only_run(chief_root) == []
