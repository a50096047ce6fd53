"""Interruptions, dead processes, unreachable stores and concurrent writers, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, http_service, make_project, stages_run
from conftest import run as run_cli
from mnist_lstm import contracts, tracking
from mnist_lstm.normalize import split

# Not in the fast tier (`make test`); `make test-all` runs them (docs/testing.md).
pytestmark = pytest.mark.slow

posix_signals = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX signals (SIGTERM to a process, SA_RESTART)"
)


@pytest.fixture
def stage_env(tiny_raw, tmp_path, write_params):
    """Processed tiny data, a params file and an environment pointing at a fresh sqlite store."""
    data = tmp_path / "processed.npz"
    contracts.save_processed(data, split(tiny_raw, 10))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
    return data, env, uri


def train_cmd(params: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mnist_lstm.train",
        "--params",
        str(params),
        "--data",
        str(data),
        "--model",
        str(out / "model.keras"),
        "--history",
        str(out / "history.csv"),
    ]


def start_training(
    stage_env, tmp_path: Path, write_params, until: str, stderr=subprocess.PIPE
) -> tuple[subprocess.Popen, Path]:
    """A train process with endless epochs, returned once it prints `until` (e.g. "Epoch 3/")."""
    data, env, _ = stage_env
    out = tmp_path / "models"
    proc = subprocess.Popen(
        train_cmd(write_params({"train.epochs": 10000}), data, out),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    wait_for_line(proc, until)
    return proc, out


def wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"process ended before printing {prefix!r}")


def runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name("mnist-lstm").experiment_id])


def test_a_run_orphaned_by_kill_9_is_marked_failed_by_the_next_pipeline(
    stage_env, tmp_path, write_params
):
    data, env, uri = stage_env
    proc, out = start_training(
        stage_env, tmp_path, write_params, "Epoch 3/", stderr=subprocess.DEVNULL
    )
    proc.kill()  # SIGKILL: no handler runs, the run stays RUNNING in the store
    proc.wait(timeout=30)
    _, (orphan,) = runs(uri)
    assert orphan.info.status == "RUNNING"
    assert not (out / "model.keras").exists()

    again = subprocess.run(
        train_cmd(write_params({"train.epochs": 1}, name="p1.yaml"), data, out),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert (
        f"run {orphan.info.run_id} was left RUNNING by a process that died; marked FAILED"
        in again.stdout
    )
    client, all_runs = runs(uri)
    status = {r.info.run_id: r.info.status for r in all_runs}
    assert status[orphan.info.run_id] == "FAILED"
    assert sorted(status.values()) == ["FAILED", "FINISHED"]
    assert (out / "model.keras").exists()


@pytest.mark.e2e
def test_an_orphan_is_marked_failed_by_evaluate_when_train_comes_from_the_run_cache(tmp_path):
    """kill -9 mid-fit, then back to params DVC's run-cache holds: train does not run, so
    evaluate -- the first stage that does -- closes the orphan; a live run elsewhere stays open."""
    import threading

    import psutil

    root, env = make_project(tmp_path / "project")
    env["PYTHONUNBUFFERED"] = "1"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = root / "params.yaml"
    cached = params.read_text()
    endless = cached.replace("epochs: 1", "epochs: 10000")
    run_cli(["dvc", "repro", "train"], root, env)  # params A: train's outputs in the run-cache

    # Another pipeline training all along (its process alive): never an orphan.
    (root / "live.yaml").write_text(endless)
    live = subprocess.Popen(
        train_cmd(root / "live.yaml", root / "data" / "processed" / "mnist.npz", tmp_path / "live"),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for_line(live, "Epoch 2/")
        threading.Thread(target=live.stdout.read, daemon=True).start()

        params.write_text(endless)  # params B, killed mid-fit
        repro = subprocess.Popen(
            ["dvc", "repro"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_line(repro, "Epoch 3/")
        (train,) = [
            p
            for p in psutil.Process(repro.pid).children(recursive=True)
            if "mnist_lstm.train" in p.cmdline()
        ]
        train.kill()  # SIGKILL: no handler runs, the run stays RUNNING in the store
        repro.communicate(timeout=120)
        assert repro.returncode != 0
        _, before = runs(uri)
        assert sorted(r.info.status for r in before) == ["FINISHED", "RUNNING", "RUNNING"]

        params.write_text(cached)  # back to A
        again = run_cli(["dvc", "repro"], root, env)
        _, after = runs(uri)
    finally:
        live.kill()
        live.wait(timeout=30)
    assert "Stage 'train' is cached - skipping run" in again.stdout
    assert stages_run(again) == ["evaluate"], again.stdout
    status = {r.info.run_id: r.info.status for r in after}
    orphans = [r.info.run_id for r in after if r.info.status == "FAILED"]
    assert len(orphans) == 1 and sorted(status.values()) == ["FAILED", "FINISHED", "RUNNING"]
    assert (
        f"tracking: run {orphans[0]} was left RUNNING by a process that died; marked FAILED"
        in again.stdout
    ), again.stdout
    (still,) = [r for r in after if r.info.status == "RUNNING"]
    assert still.data.tags["mnist_lstm.pid"] == str(live.pid)


def test_a_run_evaluate_reopened_is_owned_by_evaluate_and_never_taken_for_an_orphan(
    tmp_path, monkeypatch
):
    """evaluate reopens the training run (RUNNING again) long after train's process ended: while
    it logs, another pipeline's orphan check must leave it alone."""
    import socket

    from mnist_lstm.tracking import outage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    tracking.connect()
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = ended.stdout.strip()  # a train process that has exited
    client, _ = runs(os.environ["MLFLOW_TRACKING_URI"])
    trained = client.create_run(
        client.get_experiment_by_name("mnist-lstm").experiment_id,
        tags={
            tracking.TAG_MODEL_MD5: "0" * 32,
            outage.TAG_PID: gone,
            outage.TAG_HOST: socket.gethostname(),
        },
    ).info.run_id
    client.set_terminated(trained, "FINISHED")
    with tracking.evaluation_run("0" * 32, "unused") as (run_, is_training):
        assert is_training and run_.run_id == trained
        assert client.get_run(trained).info.status == "RUNNING"
        assert tracking.fail_orphaned_runs() == []
    assert client.get_run(trained).info.status == "FINISHED"


@posix_signals
def test_sigterm_during_training_stops_it_marks_the_run_killed_and_writes_nothing(
    stage_env, tmp_path, write_params
):
    _, _, uri = stage_env
    proc, out = start_training(stage_env, tmp_path, write_params, "Epoch 3/")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "error: interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not (out / "model.keras").exists() and not (out / "history.csv").exists()
    # No temp files either (the store's lock file, beside it for good, is none).
    assert not [p for p in tmp_path.rglob(".*") if p.is_file() and p.name != ".mlflow.db.lock"]
    _, (run,) = runs(uri)
    assert run.info.status == "KILLED"


@posix_signals
def test_sigint_ends_the_run_killed_like_sigterm(stage_env, tmp_path, write_params):
    _, _, uri = stage_env
    proc, out = start_training(stage_env, tmp_path, write_params, "Epoch 2/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "error: interrupted (SIGINT)" in err
    _, (run,) = runs(uri)
    assert run.info.status == "KILLED"
    assert not out.exists() or not any(out.iterdir())


UNREACHABLE_STORE_FAILS_WITHIN_S = 60


def test_an_unreachable_tracking_server_fails_in_seconds_naming_the_uri(
    stage_env, tmp_path, write_params
):
    data, env, _ = stage_env
    uri = f"http://127.0.0.1:{free_port()}"
    env = dict(env, MLFLOW_TRACKING_URI=uri)
    started = time.monotonic()
    result = subprocess.run(
        train_cmd(write_params({"train.epochs": 10000}), data, tmp_path / "m"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    took = time.monotonic() - started
    assert result.returncode == 1
    # Seconds: TensorFlow's import (~5 s, several times that on a busy 2-core machine) and one
    # refused connection with its one retry. MLflow's own default, 7 retries with exponential
    # backoff, takes over 2 minutes; an endless training that never asks the store, forever.
    assert took < UNREACHABLE_STORE_FAILS_WITHIN_S, f"failed after {took:.0f} s"
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: MLflow tracking URI {uri}: cannot be used")
    )
    assert "Epoch 1/" not in result.stdout and "Traceback" not in result.stderr


def test_two_pipelines_and_an_open_ui_share_one_sqlite_store_losing_nothing(
    stage_env, tmp_path, write_params
):
    data, env, uri = stage_env
    # Create the store first, as `make run` would have, then open the UI on it.
    subprocess.run(
        train_cmd(write_params({"train.epochs": 1}, name="warm.yaml"), data, tmp_path / "w"),
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    port = free_port()
    ui_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    ui_cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with http_service(ui_cmd, tmp_path, env, f"http://127.0.0.1:{port}/health"):
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search"
        body = json.dumps({"experiment_ids": ["1"], "max_results": 100}).encode()
        writers = [
            subprocess.Popen(
                train_cmd(
                    write_params({"train.epochs": 5, "train.seed": seed}, name=f"p{seed}.yaml"),
                    data,
                    tmp_path / f"m{seed}",
                ),
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed in (1, 2)
        ]
        polls = 0
        while any(w.poll() is None for w in writers) and polls < 600:
            request = urllib.request.Request(
                search, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(
                request, timeout=10
            ) as response:  # a reader, like a browser
                assert response.status == 200
            polls += 1
            time.sleep(0.2)
        outputs = [w.communicate(timeout=300) for w in writers]
    for writer, (out, err) in zip(writers, outputs):
        assert writer.returncode == 0, err
        assert "database is locked" not in err
    assert polls > 0
    client, all_runs = runs(uri)
    concurrent = [r for r in all_runs if r.data.params["train.seed"] in ("1", "2")]
    assert len(concurrent) == 2 and all(r.info.status == "FINISHED" for r in concurrent)
    for run in concurrent:
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == 5


def test_params_under_the_home_directory_are_logged_without_it(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    assert tracking._portable("/home/alice/data/mnist.npz") == "~/data/mnist.npz"
    assert tracking._portable("/srv/data/mnist.npz") == "/srv/data/mnist.npz"
    assert tracking._portable(64) == 64


@posix_signals
def test_an_interrupt_during_fit_is_held_until_a_safe_point_then_raised():
    from mnist_lstm.errors import interrupts_held

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interrupts_held() as check:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, but only recorded
            reached_safe_point = True
            check()
    assert reached_safe_point
    assert signal.getsignal(signal.SIGTERM) is before


@posix_signals
def test_released_interrupts_act_at_once_again_and_a_held_one_is_raised_on_release():
    """train releases the hold when fit ends: saving and logging are never held up."""
    from mnist_lstm.errors import interrupts_held

    before = signal.getsignal(signal.SIGTERM)
    with interrupts_held() as held:
        assert signal.getsignal(signal.SIGTERM) is not before
        held.release()  # nothing held: nothing raised
        assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interrupts_held() as held:
            os.kill(os.getpid(), signal.SIGTERM)
            held.release()
            pytest.fail("release did not raise the held SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before
