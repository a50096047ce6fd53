"""A tracking server that goes down mid-pipeline costs no work: real `mlflow server` processes
stopped while real `dvc repro` pipelines run, then restarted and synced, compared over REST with
runs whose server never went down."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, make_project, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        sys.platform == "win32",
        reason="POSIX signals stop and resume the pipeline at a chosen point",
    ),
]

EPOCHS = 4
# Wall-clock timings differ between any two runs; every other value must match exactly.
TIMINGS = {"epoch_seconds", "train_seconds", "seconds_per_epoch"}


class MlflowServer:
    """`mlflow server` on a sqlite store and a proxied artifact folder, stoppable and restartable
    on the same port (as a team's server is after a restart)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile("w+")

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}",
            "--artifacts-destination", str(self.state / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.process = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer within 2 minutes:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # a crash, not a polite shutdown
            self.process.wait(timeout=30)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]

    def api(self, endpoint: str, **query) -> dict:
        """GET the MLflow REST API."""
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query, doseq=True)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(shared_server):
    """The module's server, up (a test that failed mid-outage may have left it down)."""
    if shared_server.process.poll() is not None:
        shared_server.start()
    return shared_server


def tracked_project(root: Path, uri: str) -> tuple[Path, dict[str, str]]:
    root, env = make_project(root, train__epochs=EPOCHS)
    return root, dict(env, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")


def repro_with_outage(root: Path, env: dict, server: MlflowServer, when: str) -> str:
    """`dvc repro`, with the server killed once the pipeline prints a line starting with `when`:
    the pipeline is paused (SIGSTOP) at that line, so the outage lands exactly there. The
    server stays down until the pipeline ends. Returns the pipeline's output."""
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(when):
            os.killpg(proc.pid, signal.SIGSTOP)
            server.stop()
            os.killpg(proc.pid, signal.SIGCONT)
            break
    seen.extend(proc.stdout)
    proc.wait(timeout=600)
    output = "".join(seen)
    assert proc.returncode == 0, output[-4000:]
    assert any(line.startswith(when) for line in seen), output[-4000:]
    return output


def sync(root: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mnist_lstm.sync"], root, env, check=check)


def search_runs(server: MlflowServer, filter_string: str, order_by: list[str] = ()) -> list[dict]:
    """The experiment's runs matching `filter_string`, over REST."""
    experiment = server.api("experiments/get-by-name", experiment_name="mnist-lstm")
    return server.post(
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": filter_string,
            "order_by": list(order_by),
        },
    ).get("runs", [])


def the_run(server: MlflowServer, model_md5: str, newest: bool = True) -> dict:
    """The newest run (over REST) tagged with this model md5."""
    order = f"attributes.start_time {'DESC' if newest else 'ASC'}"
    return search_runs(server, f"tags.`dvc.model_md5` = '{model_md5}'", [order])[0]


def snapshot(server: MlflowServer, run: dict, once: bool = False) -> dict:
    """Everything a user sees of a run, read back over REST; timings by step only. `once`:
    each (step, value) point counted once (a stage that ran again logged it again)."""
    run_id = run["info"]["run_id"]
    data = run["data"]
    history = {}
    for metric in data.get("metrics", []):
        if metric["key"].startswith("system/"):  # the machine's readings: no two runs agree
            history[metric["key"]] = "sampled"
            continue
        points = server.api("metrics/get-history", run_id=run_id, metric_key=metric["key"])
        values = [
            (p["step"], None if metric["key"] in TIMINGS else p["value"]) for p in points["metrics"]
        ]
        history[metric["key"]] = sorted(set(values) if once else values)
    artifacts = sorted(
        (f["path"], f.get("file_size"))
        for f in server.api("artifacts/list", run_id=run_id, path="reports").get("files", [])
    )
    models = server.post(
        "logged-models/search",
        {
            "experiment_ids": [run["info"]["experiment_id"]],
            "filter": f"source_run_id = '{run_id}'",
        },
    ).get("models", [])
    return {
        "status": run["info"]["status"],
        "params": {p["key"]: p["value"] for p in data.get("params", [])},
        "tags": {
            t["key"]: t["value"]
            for t in data.get("tags", [])
            if t["key"].startswith(("dvc.", "data.", "train.", "mlflow.source.name"))
        },
        "metrics": history,
        "reports": artifacts,
        "top_artifacts": sorted(
            f["path"] for f in server.api("artifacts/list", run_id=run_id).get("files", [])
        ),
        "datasets": sorted(
            (
                d["dataset"]["name"],
                d["dataset"]["digest"],
                d["dataset"]["source"],
                tuple(t["value"] for t in d.get("tags", [])),
            )
            for d in run.get("inputs", {}).get("dataset_inputs", [])
        ),  # fmt: skip
        "models": [(m["info"]["name"], m["info"]["status"]) for m in models],
    }


def model_weights(uri: str, run: dict):
    import mlflow

    client = mlflow.MlflowClient(uri)
    (logged,) = client.search_logged_models(
        [run["info"]["experiment_id"]], filter_string=f"source_run_id = '{run['info']['run_id']}'"
    )
    mlflow.set_tracking_uri(uri)
    return mlflow.keras.load_model(f"models:/{logged.model_id}").get_weights()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_server):
    """A pipeline whose server never went down: (dvc.lock, the run's snapshot, its weights)."""
    server = shared_server
    root, env = tracked_project(tmp_path_factory.mktemp("reference"), server.uri)
    run(["dvc", "repro"], root, env)
    lock = (root / "dvc.lock").read_text()
    from conftest import locked_model_md5

    md5 = locked_model_md5(root)
    found = the_run(server, md5)
    return lock, md5, snapshot(server, found), model_weights(server.uri, found)


def assert_same_run(server, reference, outage_run, once: bool = False) -> None:
    import numpy as np

    _, _, ref_snapshot, ref_weights = reference
    got = snapshot(server, outage_run, once=once)
    assert got["status"] == "FINISHED"
    assert got == ref_snapshot
    for ours, theirs in zip(model_weights(server.uri, outage_run), ref_weights, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_server_killed_mid_training_the_stage_finishes_and_sync_completes_the_run(
    tmp_path, server, reference
):
    ref_lock, md5, _, _ = reference
    root, env = tracked_project(tmp_path / "outage", server.uri)

    output = repro_with_outage(root, env, server, "Epoch 2/")

    # Training went on: the same outputs, byte for byte, as without the outage.
    assert (root / "dvc.lock").read_text() == ref_lock
    assert "Traceback" not in output
    assert f"tracking: {server.uri} stopped answering" in output
    behind = [line for line in output.splitlines() if " is behind" in line]
    assert behind and all("`make sync`" in line for line in behind), output[-3000:]
    assert "metric values" in behind[0] and "the model" in behind[0]

    # Still down: sync says so in one line per run, keeps everything, exits 1.
    down = sync(root, env, check=False)
    assert down.returncode == 1 and "not synced" in down.stdout and "Traceback" not in down.stderr
    waiting = run([sys.executable, "-m", "mnist_lstm.sync", "--status"], root, env)
    assert "wait for" in waiting.stdout
    lineage = run([sys.executable, "-m", "mnist_lstm.lineage"], root, env, check=False)
    assert lineage.stdout.startswith("not synced run ") and "Traceback" not in lineage.stderr

    server.start()
    synced = sync(root, env)
    assert "in sync with" in synced.stdout, synced.stdout
    assert not any((root / ".tracking-spool").glob("*/run.json"))
    outage_run = the_run(server, md5)
    assert outage_run["info"]["run_id"] != the_run(server, md5, newest=False)["info"]["run_id"]
    assert_same_run(server, reference, outage_run)

    again = sync(root, env)
    assert again.stdout.strip() == "sync: nothing waits"
    assert snapshot(server, the_run(server, md5)) == snapshot(server, outage_run)


def test_server_killed_during_evaluate_the_evaluation_reaches_the_training_run(
    tmp_path, server, reference
):
    ref_lock, md5, _, _ = reference
    root, env = tracked_project(tmp_path / "outage", server.uri)

    output = repro_with_outage(root, env, server, "evaluate: logging to the run that trained it")

    assert (root / "dvc.lock").read_text() == ref_lock
    assert json.loads((root / "reports" / "metrics.json").read_text())
    assert "Traceback" not in output and " is behind" in output

    server.start()
    # The next pipeline syncs first, by itself: nothing to rerun, but `dvc repro -f -s evaluate`
    # opens the store, and catches up before it logs anything.
    again = run(["dvc", "repro", "-f", "-s", "evaluate"], root, env)
    assert "tracking: run " in again.stdout and "in sync with" in again.stdout
    assert_same_run(server, reference, the_run(server, md5), once=True)


def test_sync_killed_midway_resumes_and_a_repeated_sync_duplicates_nothing(
    tmp_path, server, reference
):
    _, md5, _, _ = reference
    root, env = tracked_project(tmp_path / "offline", server.uri)
    offline = dict(env, MNIST_LSTM_TRACKING="offline")
    output = run(["dvc", "repro"], root, offline).stdout
    assert " is behind (MNIST_LSTM_TRACKING=offline)" in output
    (spooled,) = [p for p in (root / ".tracking-spool").iterdir() if p.is_dir()]
    untouched = tmp_path / "spool-copy"
    shutil.copytree(spooled, untouched)

    # SIGTERM lands while the sync is sending: it stops between two writes.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_lstm.sync"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if "sending" in line:
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "sync interrupted (SIGTERM)" in err and "Traceback" not in err
    (half,) = runs_of_spool(server, spooled.name)
    assert half["info"]["status"] == "RUNNING"  # created, not complete: the model is not there
    assert "dvc.model_md5" not in {t["key"] for t in half["data"].get("tags", [])}

    resumed = sync(root, env)
    assert "in sync with" in resumed.stdout
    complete = the_run(server, md5)
    assert complete["info"]["run_id"] == half["info"]["run_id"]
    assert_same_run(server, reference, complete)

    # The whole spool replayed again (as if every write's receipt were lost): nothing doubles.
    shutil.copytree(untouched, spooled)
    sync(root, env)
    assert snapshot(server, the_run(server, md5)) == snapshot(server, complete)
    assert len(runs_of_spool(server, spooled.name)) == 1


def runs_of_spool(server: MlflowServer, spool_id: str) -> list[dict]:
    return search_runs(server, f"tags.`mnist_lstm.spool_id` = '{spool_id}'")


def test_a_sqlite_store_locked_past_its_timeout_is_an_outage_too(tmp_path, tiny_raw, write_params):
    """The repo's own store: another process holds sqlite's write lock longer than MLflow's 20 s
    busy timeout while a training runs; training goes on, and the sync completes the run."""
    import mlflow

    from mnist_lstm import contracts
    from mnist_lstm.normalize import split

    data = tmp_path / "processed.npz"
    contracts.save_processed(data, split(tiny_raw, 10))
    db = tmp_path / "mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}", PYTHONUNBUFFERED="1")
    env.pop("MNIST_LSTM_TRACKING", None)
    train = [
        sys.executable, "-m", "mnist_lstm.train", "--params",
        str(write_params({"train.epochs": 3})), "--data", str(data),
        "--model", str(tmp_path / "model.keras"), "--history", str(tmp_path / "history.csv"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        train, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("Epoch 1/"):
            break
    proc.send_signal(signal.SIGSTOP)
    locker = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)", str(db)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert locker.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    locker.wait(timeout=60)

    assert proc.returncode == 0, err[-3000:]
    assert "stopped answering (database is locked)" in out and " is behind" in out
    assert "Traceback" not in err
    assert (tmp_path / "model.keras").is_file()
    synced = run([sys.executable, "-m", "mnist_lstm.sync"], tmp_path, env)
    assert "in sync with" in synced.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (finished,) = client.search_runs([client.get_experiment_by_name("mnist-lstm").experiment_id])
    assert finished.info.status == "FINISHED"
    assert len(client.get_metric_history(finished.info.run_id, "loss")) == 3
