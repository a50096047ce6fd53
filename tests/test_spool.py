"""The spool's own guarantees (order, durability, torn writes, who may remove it) and the
tracking mode switch; the outage itself is tested with real servers in test_outage.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_lstm.tracking import backlog, spool


def test_ops_come_back_in_order_with_their_files_and_a_torn_last_line_is_ignored(tmp_path):
    artifact = tmp_path / "report.csv"
    artifact.write_text("a,b\n1,2\n")
    s = spool.Spool.create(tmp_path, "http://store", "run1")
    s.append({"op": "params", "params": {"train.units": "64"}})
    s.append({"op": "artifact", "artifact_path": "reports"}, [(artifact, "report.csv")])
    artifact.write_text("changed after logging")
    with open(s.path / "ops.jsonl", "a") as out:
        out.write('{"op": "metrics", "metri')  # the writer died mid-line

    ops = s.ops()
    assert [op["seq"] for op in ops] == [1, 2] and [op["op"] for op in ops] == [
        "params",
        "artifact",
    ]
    (copied,) = s.files_of(ops[1])
    assert copied.read_text() == "a,b\n1,2\n"  # what was logged, not what the file became


def test_sync_progress_is_recorded_and_only_the_rest_is_unsynced(tmp_path):
    s = spool.Spool.create(tmp_path, "http://store", None, {"run_name": "r"})
    for step in range(3):
        s.append({"op": "metrics", "metrics": {"loss": 1.0}, "step": step, "timestamp": 1})
    assert s.run_id is None and "not in the store yet" in s.display_id
    s.mark_synced("abc", 2)
    assert s.run_id == "abc"
    assert [op["step"] for op in s.unsynced()] == [2]


def test_a_spool_is_finished_only_when_synced_and_no_live_stage_writes_to_it(tmp_path):
    s = spool.Spool.create(tmp_path, "http://store", "run1")
    s.append({"op": "end", "status": "FINISHED", "end_time": 1})
    s.mark_synced("run1", 1)
    assert s.writer_alive() and not s.finished()  # this process still holds it
    s.release()
    assert s.finished()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    (s.path / "writer.json").write_text(json.dumps({"pid": int(dead), "host": _host()}))
    assert not s.writer_alive()  # its writer died: a sync may finish it


def test_an_op_written_while_a_sync_checks_the_spool_is_never_deleted_unsent(tmp_path):
    """The stage's last op and its release can fall between a sync's two reads."""
    writer = spool.Spool.create(tmp_path, "http://store", "run1")
    writer.append({"op": "metrics", "metrics": []})
    syncing = spool.Spool(writer.path)
    syncing.mark_synced("run1", 1)

    class LastWriteDuringTheCheck(spool.Spool):
        def writer_alive(self) -> bool:
            writer.append({"op": "end", "status": "FINISHED", "end_time": 1})
            writer.release()
            return super().writer_alive()

    assert not LastWriteDuringTheCheck(writer.path).finished()
    assert [op["op"] for op in syncing.unsynced()] == ["end"]


def _host() -> str:
    import socket

    return socket.gethostname()


def test_pending_lists_spools_per_store_oldest_first(tmp_path):
    first = spool.Spool.create(tmp_path, "http://a", "1")
    spool.Spool.create(tmp_path, "http://b", "2")
    third = spool.Spool.create(tmp_path, "http://a", "3")
    assert [s.path for s in spool.pending(tmp_path, "http://a")] == [first.path, third.path]
    assert len(spool.pending(tmp_path)) == 3
    (tmp_path / spool.SPOOL_DIR / "half-made").mkdir()  # no run.json: never a spool
    assert len(spool.pending(tmp_path)) == 3


def test_the_lock_can_be_taken_again_by_its_holder(tmp_path):
    with spool.lock(tmp_path), spool.lock(tmp_path):
        assert spool.lock(tmp_path).is_locked


# `python -m mnist_lstm.sync` as it is, with filelock's own debug lines on stderr: the proof that
# it reached the lock and found it taken (filelock polls; no blocked flock shows in /proc/locks).
SYNC_SAYING_WHEN_IT_WAITS = """
import logging, runpy
logging.basicConfig(level=logging.WARNING)
logging.getLogger("filelock").setLevel(logging.DEBUG)
runpy.run_module("mnist_lstm.sync", run_name="__main__")
"""


def test_syncs_in_other_processes_wait_for_the_lock_and_send_each_run_once(tmp_path, monkeypatch):
    """`make sync` twice at once while this process holds the lock (as a stage claiming its
    spool does): both wait, nothing is sent meanwhile, then the runs land once each."""
    import mlflow

    uri = _store(tmp_path, monkeypatch)
    for name in ("first", "second"):
        _spooled_run(tmp_path, uri, name)
    env = {k: v for k, v in os.environ.items() if k != "MNIST_LSTM_TRACKING"}
    syncs, logs = [], [tmp_path / f"sync-{i}.log" for i in range(2)]
    waiting = f"not acquired on {spool.lock(tmp_path).lock_file}"  # not the store's own lock
    try:
        with spool.lock(tmp_path):
            for log in logs:
                with log.open("w") as out:
                    syncs.append(
                        subprocess.Popen(
                            [sys.executable, "-c", SYNC_SAYING_WHEN_IT_WAITS],
                            cwd=tmp_path,
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
            deadline = time.monotonic() + 120
            while not all(waiting in log.read_text() for log in logs):
                said = [log.read_text() for log in logs]
                assert all(sync.poll() is None for sync in syncs), said
                assert time.monotonic() < deadline, said
                time.sleep(0.2)
            assert _runs(uri) == [] and len(spool.pending(tmp_path)) == 2  # nothing sent yet
    finally:
        for sync in syncs:
            sync.wait(timeout=120)

    said = [log.read_text() for log in logs]
    assert [sync.returncode for sync in syncs] == [0, 0], said
    sent = [line for text in said for line in text.splitlines() if ": sending " in line]
    assert len(sent) == 2, said  # one sync sent both runs, the other found nothing waiting
    runs = _runs(uri)
    assert sorted(run.data.params["name"] for run in runs) == ["first", "second"]
    client = mlflow.MlflowClient(uri)
    assert all(len(client.get_metric_history(run.info.run_id, "loss")) == 1 for run in runs)
    assert spool.pending(tmp_path) == []


def test_behind_reports_count_what_waits():
    ops = [
        {"op": "metrics", "metrics": {"loss": 1.0, "accuracy": 0.5}},
        {"op": "metrics", "metrics": {"loss": 0.9}},
        {"op": "artifact", "files": ["a.csv"]},
        {"op": "model", "files": ["model.keras", "input_example.npy"]},
    ]
    assert backlog.describe(ops) == "3 metric values, 1 artifact, the model"


def test_tracking_mode_is_online_offline_or_a_one_line_error(monkeypatch):
    from mnist_lstm import tracking
    from mnist_lstm.errors import UserError

    monkeypatch.delenv(tracking.TRACKING_MODE_ENV, raising=False)
    assert tracking.offline() is False
    monkeypatch.setenv(tracking.TRACKING_MODE_ENV, "Offline")
    assert tracking.offline() is True
    monkeypatch.setenv(tracking.TRACKING_MODE_ENV, "later")
    with pytest.raises(UserError, match="must be online or offline, got 'later'"):
        tracking.offline()


# --- torn lines, damaged spools, names and stores (issue 24, part 3) ---


def test_a_torn_last_line_is_cut_before_the_next_append_so_nothing_glues_onto_it(tmp_path):
    s = spool.Spool.create(tmp_path, "http://store", "run1")
    s.append({"op": "params", "params": {"train.units": "64"}})
    with open(s.path / "ops.jsonl", "a") as out:
        out.write('{"op": "metrics", "metri')  # a crash, or a full disk, mid-line
    # The next stage to write (another process: it reads the last seq from the file) appends.
    spool.Spool(s.path).append({"op": "end", "status": "FINISHED", "end_time": 1})

    assert [(op["seq"], op["op"]) for op in s.ops()] == [(1, "params"), (2, "end")]
    assert (s.path / "ops.jsonl").read_text().count("\n") == 2


def _store(tmp_path, monkeypatch, name="store"):
    """A real sqlite MLflow store for this project (cwd = tmp_path, its root)."""
    uri = f"sqlite:///{tmp_path / f'{name}.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MNIST_LSTM_TRACKING", raising=False)
    return uri


def _spooled_run(root, uri, name, artifact=None):
    """A spool as an offline stage leaves it: a run to create, a param, a metric, an end."""
    s = spool.Spool.create(
        root, uri, None, {"run_name": name, "start_time": 1, "tags": {"who": name}}
    )
    s.append({"op": "params", "params": {"name": name}})
    s.append({"op": "metrics", "metrics": {"loss": 0.5}, "step": 0, "timestamp": 1})
    if artifact is not None:
        s.append({"op": "artifact", "artifact_path": "reports"}, [(artifact, artifact.name)])
    s.append({"op": "end", "status": "FINISHED", "end_time": 2})
    s.release()
    return s


def _runs(uri):
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("mnist-lstm")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id])


def _make_sync(capsys) -> tuple[int, str, str]:
    from mnist_lstm import sync

    code = sync.main([])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_spool_that_cannot_be_read_is_moved_aside_and_the_others_sync(
    tmp_path, monkeypatch, capsys
):
    uri = _store(tmp_path, monkeypatch)
    first = _spooled_run(tmp_path, uri, "first")
    middle = _spooled_run(tmp_path, uri, "middle")
    lines = (middle.path / "ops.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"op": "metrics", "met{"op": "metrics", "seq": 2}\n'  # glued by an old writer
    (middle.path / "ops.jsonl").write_text("".join(lines))
    no_meta = _spooled_run(tmp_path, uri, "no-meta")
    (no_meta.path / "run.json").write_text('{"spool_id": "x", "tracking_')
    last = _spooled_run(tmp_path, uri, "last")

    code, out, err = _make_sync(capsys)

    assert code == 1 and "Traceback" not in err
    assert sorted(run.data.params["name"] for run in _runs(uri)) == ["first", "last"]
    assert not first.path.exists() and not last.path.exists()  # synced, removed
    aside = tmp_path / spool.SPOOL_DIR / spool.QUARANTINE
    for damaged, why in ((middle, "ops.jsonl line 2 is not an op"), (no_meta, "run.json")):
        moved = aside / damaged.path.name
        assert (moved / "ops.jsonl").is_file()  # kept whole, never deleted
        (line,) = [line for line in out.splitlines() if damaged.path.name in line]
        assert why in line and f"moved to {moved}" in line, out

    # Work is still undone while they wait there: the next sync says so, and sends nothing twice.
    code, out, _ = _make_sync(capsys)
    assert code == 1 and out.count("waits in") == 2 and len(_runs(uri)) == 2


def test_file_names_that_leave_the_spool_are_refused_and_nothing_is_sent(
    tmp_path, monkeypatch, capsys
):
    uri = _store(tmp_path, monkeypatch)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    report = tmp_path / "report.csv"
    report.write_text("a\n1\n")
    made = []
    # A symlink needs a privilege on Windows: there, names only.
    for how in ("absolute", "dotdot", "symlink")[: 2 if os.name == "nt" else 3]:
        s = _spooled_run(tmp_path, uri, how, artifact=report)
        ops = s.path / "ops.jsonl"
        (copied,) = s.files_of(s.ops()[2])
        if how == "symlink":
            copied.unlink()
            copied.symlink_to(secret)
        else:
            name = str(secret) if how == "absolute" else "../../../../secret.txt"
            ops.write_text(ops.read_text().replace('"report.csv"', json.dumps(name)))
        made.append(s)

    code, out, err = _make_sync(capsys)

    assert code == 1 and "Traceback" not in err
    assert _runs(uri) == []  # not even the run was created: the spool is checked whole first
    assert not list(tmp_path.rglob("mlruns")) and not list(tmp_path.rglob("mlartifacts"))
    for s in made:
        (line,) = [line for line in out.splitlines() if s.path.name in line]
        assert "not a plain name inside the spool" in line or "not a file inside" in line, line
    # Nor can a stage spool such a name in the first place.
    writing = spool.Spool.create(tmp_path, uri, "run1")
    with pytest.raises(spool.SpoolDamaged, match="not a plain name"):
        writing.append({"op": "artifact"}, [(secret, str(secret))])
    assert writing.ops() == [] and not (writing.path / "files" / "1").exists()


def test_a_spool_goes_only_to_the_store_it_was_written_for(tmp_path, monkeypatch, capsys):
    uri = _store(tmp_path, monkeypatch)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    edited = _spooled_run(tmp_path, uri, "edited")
    meta = json.loads((edited.path / "run.json").read_text())
    (edited.path / "run.json").write_text(json.dumps({**meta, "tracking_uri": elsewhere}))

    code, out, _ = _make_sync(capsys)

    assert code == 1 and _runs(uri) == [] and _runs(elsewhere) == []
    assert "other than the one this spool was written for" in out
    assert (tmp_path / spool.SPOOL_DIR / spool.QUARANTINE / edited.path.name).is_dir()


def test_a_spool_from_before_stores_were_recorded_goes_only_to_the_configured_store(
    tmp_path, monkeypatch, capsys
):
    _store(tmp_path, monkeypatch)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    s = _spooled_run(tmp_path, other, "old")
    legacy = s.path.with_name(s.path.name.split("-")[0])  # the name spools had until 2026-11-30
    s.path.rename(legacy)
    meta = json.loads((legacy / "run.json").read_text())
    (legacy / "run.json").write_text(json.dumps({**meta, "spool_id": legacy.name}))

    code, out, _ = _make_sync(capsys)
    assert code == 1 and _runs(other) == [] and f"MLFLOW_TRACKING_URI={other} make sync" in out

    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    code, out, _ = _make_sync(capsys)
    assert code == 0 and [run.data.params["name"] for run in _runs(other)] == ["old"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_metadata_and_outputs_are_fsynced_before_and_after_their_rename(tmp_path, monkeypatch):
    """A crash right after a rename must find the new bytes under the name (file fsynced first)
    and the rename itself on disk (its directory fsynced after)."""
    import os

    from mnist_lstm import contracts

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    s = spool.Spool.create(tmp_path, "http://store", "run1")
    events.clear()
    s.mark_synced("run1", 0)
    contracts.write_json(tmp_path / "out" / "metrics.json", {"accuracy": 1.0})

    renames = [i for i, event in enumerate(events) if event[0] == "replace"]
    assert len(renames) == 2, events
    for i in renames:
        _, src, dst = events[i]
        assert events[i - 1] == ("fsync", src), events  # the new bytes, before the rename
        assert events[i + 1] == ("fsync", str(Path(dst).parent)), events  # the rename, after
