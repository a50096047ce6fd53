"""The spool's own guarantees (order, durability, torn writes, who may remove it) and the
tracking mode switch; the outage itself is tested with real servers in test_outage.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mnist_lstm.tracking import spool


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


def test_behind_reports_count_what_waits():
    ops = [
        {"op": "metrics", "metrics": {"loss": 1.0, "accuracy": 0.5}},
        {"op": "metrics", "metrics": {"loss": 0.9}},
        {"op": "artifact", "files": ["a.csv"]},
        {"op": "model", "files": ["model.keras", "input_example.npy"]},
    ]
    assert spool.describe(ops) == "3 metric values, 1 artifact, the model"


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
