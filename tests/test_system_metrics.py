"""System metrics in the run: real train and evaluate processes on tiny data log MLflow's
`system/...` series into a real sqlite store, through the spool when offline; a failing sampler
is one line, never a failed stage. (Two hosts: tests/test_multiworker.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mnist_lstm import contracts
from mnist_lstm.normalize import split

CPU = "system/cpu_utilization_percentage"
MEMORY = "system/system_memory_usage_megabytes"
# Short, so that a stage of a few seconds takes several samples.
INTERVAL = 0.5


@pytest.fixture
def stage(tmp_path, tiny_raw, write_params):
    """Runs a stage's module in a fresh process in tmp_path, on tiny processed data, logging to a
    sqlite store there; returns the finished process."""
    contracts.save_processed(tmp_path / "processed.npz", split(tiny_raw, 10))
    (tmp_path / "provenance.json").write_text(json.dumps({"source": "path"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_LSTM_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONUNBUFFERED="1")

    def run_stage(
        module: str, interval: float = INTERVAL, epochs: int = 4, prelude: str = "", **extra_env
    ) -> subprocess.CompletedProcess:
        params = write_params(
            {"train.epochs": epochs, "train.units": 8, "system_metrics.interval_s": interval}
        )
        args = ["--params", str(params), "--data", "processed.npz"]
        args += ["--model", "model.keras", "--history", "history.csv"]
        if module == "evaluate":
            reports = ("metrics.json", "per-class.csv", "confusion.csv", "holdout.csv", "val.csv")
            names = ("metrics", "per-class", "confusion", "holdout", "val-predictions")
            args += ["--provenance", "provenance.json"]
            args += [arg for name, file in zip(names, reports) for arg in (f"--{name}", file)]
            args += ["--confusion-png", "confusion.png", "--curves-png", "curves.png"]
        code = f"{prelude}\nimport sys\nfrom mnist_lstm.{module} import main\nsys.exit(main())"
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=tmp_path,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run_stage


def the_run(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("mnist-lstm").experiment_id])
    return client, found


def series(client, run, key: str) -> list:
    return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_training_run_holds_cpu_and_memory_series_taken_while_it_ran(stage, tmp_path):
    assert_ok(stage("train"))
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["system_metrics.interval_s"] == str(INTERVAL)
    for key in (CPU, MEMORY):
        points = series(client, run, key)
        # A train stage of a few seconds: a sample every half second, and the last at its end.
        assert len(points) >= 2, (key, points)
        assert [p.step for p in points] == list(range(len(points)))
        # Each point is stamped when it was sampled, in order, while the run was open.
        stamps = [p.timestamp for p in points]
        assert stamps == sorted(stamps)
        assert run.info.start_time <= stamps[0] and stamps[-1] <= run.info.end_time
    # Fitting keeps the CPU busy and a TensorFlow process takes hundreds of MB.
    assert max(p.value for p in series(client, run, CPU)) > 0
    assert min(p.value for p in series(client, run, MEMORY)) > 100


@pytest.mark.slow
def test_interval_0_logs_no_system_metrics(stage, tmp_path):
    assert_ok(stage("train", interval=0))
    _, run = the_run(tmp_path)
    assert "loss" in run.data.metrics
    assert not [key for key in run.data.metrics if key.startswith("system/")]
    assert run.data.params["system_metrics.interval_s"] == "0.0"


@pytest.mark.slow
def test_offline_train_and_evaluate_samples_reach_the_run_through_the_spool(stage, tmp_path):
    offline = {"MNIST_LSTM_TRACKING": "offline"}
    assert_ok(stage("train", **offline))
    assert_ok(stage("evaluate", **offline))
    assert list((tmp_path / ".tracking-spool").iterdir())  # where offline writes wait
    synced = subprocess.run(
        [sys.executable, "-m", "mnist_lstm.sync"],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_LSTM_"))},
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synced.returncode == 0 and "in sync with" in synced.stdout, synced.stdout
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and "eval/val_accuracy" in run.data.metrics
    for key in (CPU, MEMORY):
        points = series(client, run, key)
        # Train's samples, then evaluate's (at least its last), numbered on from train's.
        assert len(points) >= 3, (key, points)
        assert [p.step for p in points] == list(range(len(points)))
        assert points[-1].timestamp > run.info.end_time - 60_000
    # Evaluate's last sample is taken as it ends, after it logged its scores.
    (scored,) = client.get_metric_history(run.info.run_id, "eval/val_accuracy")
    assert [p for p in series(client, run, CPU) if p.timestamp >= scored.timestamp]


# The monitor MLflow samples the CPU with fails from its third reading on (the first two: the
# reading that starts the clock, then one sample).
FAILING_MONITOR = """
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
readings = []
real = CPUMonitor.collect_metrics
def collect(self):
    readings.append(1)
    if len(readings) > 2:
        raise OSError("/proc/stat: no such file")
    real(self)
CPUMonitor.collect_metrics = collect
"""


@pytest.mark.slow
def test_a_sampler_that_fails_is_one_line_and_the_stage_finishes(stage, tmp_path):
    result = stage("train", prelude=FAILING_MONITOR)
    assert_ok(result)
    said = [line for line in result.stdout.splitlines() if line.startswith("system metrics")]
    assert said == [
        "system metrics: sampling stopped (/proc/stat: no such file); the stage goes on"
    ], said
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and len(series(client, run, "loss")) == 4
    assert len(series(client, run, CPU)) == 1  # what it sampled before it failed


# --- in-process: the sampler and the writer it shares with the stage ---


def test_stop_takes_a_last_sample_and_a_failing_sample_stops_sampling_in_one_line(
    monkeypatch, capsys
):
    from mnist_lstm.tracking import system_metrics

    published = []
    sampler = system_metrics.Sampler(60, published.append, first_step=7)
    sampler.start()
    sampler.stop()  # long before the first interval is up
    ((step, _, values),) = published
    assert step == 7 and {"cpu_utilization_percentage", "disk_usage_percentage"} <= values.keys()
    sampler.stop()  # a second stop does nothing

    def refuse(sample):
        raise RuntimeError("the store refused it")

    failing = system_metrics.Sampler(0.01, refuse)
    failing.start()
    failing._thread.join(10)
    failing.stop()
    assert capsys.readouterr().out.splitlines() == [
        "system metrics: sampling stopped (the store refused it); the stage goes on"
    ]


def test_the_run_writer_takes_writes_from_two_threads_at_once_and_keeps_each_whole(
    tmp_path, monkeypatch
):
    from mnist_lstm.tracking import outage, spool

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_LSTM_TRACKING", "offline")
    run = outage.new_run("threads", {})

    def write(name: str) -> None:
        for step in range(200):
            run.log_metrics({name: float(step)}, step=step, timestamp=1000 + step)

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ops = [op for op in spool.Spool(run.spool.path).ops() if op["op"] == "metrics"]
    for name in ("a", "b"):
        mine = [(op["step"], op["timestamp"]) for op in ops if name in op["metrics"]]
        assert mine == [(step, 1000 + step) for step in range(200)]
    seqs = [op["seq"] for op in ops]
    assert len(ops) == 400 and seqs == list(range(seqs[0], seqs[0] + 400))


def test_hosts_share_their_samples_as_bytes_padded_into_int32_words():
    from mnist_lstm.cluster import Cluster
    from mnist_lstm.distributed import share
    from mnist_lstm.runtime import tf

    alone = Cluster(hosts=("localhost:1",), rank=0, workers=1)
    payload = json.dumps([[0, 1, {"cpu_utilization_percentage": 3.5}]]).encode()
    for sent in (payload, payload + b"x", b""):  # sizes that are and are not whole words
        assert share(tf.distribute.get_strategy(), alone, sent) == [sent]
