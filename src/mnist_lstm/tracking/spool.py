"""The tracking spool: MLflow writes the store could not take yet, kept on disk, in order, until
`make sync` (`python -m mnist_lstm.sync`) or the next pipeline run replays them.

Hand-written machinery with no mlflow in it: outage.py says what each op means and how it is
replayed; this module keeps ops durable, ordered, replayed once, and safe to interrupt.

    <project>/.tracking-spool/<spool id>/
        run.json     where the ops belong: the tracking URI, and the store's run id, or what it
                     takes to create the run there (offline, or a store that was down at start)
        ops.jsonl    one op a line: {"seq": n, "op": ..., ...}; a torn last line is ignored
        files/<n>/   copies of the files op n logs (artifacts, the model)
        synced.json  {"run_id": ..., "seq": the last op the store has}
        writer.json  {"pid": ..., "host": ...} while a stage is writing to it

A spool whose ops are all in the store and which no live stage writes to is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

SPOOL_DIR = ".tracking-spool"


def spool_root(project: Path) -> Path:
    return Path(project) / SPOOL_DIR


_LOCKS: dict[Path, FileLock] = {}


def lock(project: Path, timeout: float = 600) -> FileLock:
    """One lock per project for syncing and for claiming or removing a spool; one object per
    path in a process, so that a holder may take it again (FileLock counts)."""
    root = spool_root(project)
    root.mkdir(exist_ok=True)
    path = (root / ".lock").resolve()
    if path not in _LOCKS:
        _LOCKS[path] = FileLock(str(path), timeout=timeout)
    return _LOCKS[path]


def _write_json(path: Path, value: Any) -> None:
    """Atomic: a reader sees the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, sort_keys=True))
    os.replace(tmp, path)


class Spool:
    """One run's deferred ops."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # The last seq this object appended (one writer at a time: `claim`); read from the file
        # once, not on every write of a 10-epoch run's ~40 ops.
        self._seq: int | None = None

    @classmethod
    def create(
        cls,
        project: Path,
        tracking_uri: str,
        run_id: str | None,
        create: dict[str, Any] | None = None,
    ) -> Spool:
        spool_id = uuid.uuid4().hex
        path = spool_root(project) / spool_id
        (path / "files").mkdir(parents=True)
        spool = cls(path)
        # Claimed before it is a spool (run.json): a sync never takes it for an abandoned one.
        spool.claim()
        (path / "ops.jsonl").touch()
        _write_json(
            path / "run.json",
            {
                "spool_id": spool_id,
                "tracking_uri": tracking_uri,
                "run_id": run_id,
                "create": create,
                "spooled_at": time.time(),
            },
        )
        return spool

    # --- identity ---

    @property
    def spool_id(self) -> str:
        return self.path.name

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "run.json").read_text())

    @property
    def tracking_uri(self) -> str:
        return self.meta["tracking_uri"]

    @property
    def run_id(self) -> str | None:
        """The store's id for the run; None while a run to be created is not created yet."""
        return self.meta["run_id"] or self.synced().get("run_id")

    @property
    def display_id(self) -> str:
        return self.run_id or f"{self.spool_id} (not in the store yet)"

    # --- writing ---

    def append(self, op: dict[str, Any], files: Iterable[tuple[Path, str]] = ()) -> int:
        """Add an op; `files` are (source, name) pairs copied in first. Durable on return."""
        seq = (self.last_seq() if self._seq is None else self._seq) + 1
        names = []
        for source, name in files:
            target = self.path / "files" / str(seq) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            names.append(name)
        line = json.dumps({**op, "seq": seq, "files": names}, sort_keys=True) + "\n"
        with open(self.path / "ops.jsonl", "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        self._seq = seq
        return seq

    def claim(self) -> None:
        _write_json(self.path / "writer.json", {"pid": os.getpid(), "host": socket.gethostname()})

    def release(self) -> None:
        (self.path / "writer.json").unlink(missing_ok=True)

    def writer_alive(self) -> bool:
        """Whether a live stage on this host may still append to it."""
        try:
            writer = json.loads((self.path / "writer.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if writer.get("host") != socket.gethostname():
            return True  # another host's process: cannot tell, assume it is alive
        return writer.get("pid") == os.getpid() or psutil.pid_exists(int(writer.get("pid", 0)))

    # --- reading and replaying ---

    def ops(self) -> list[dict[str, Any]]:
        ops = []
        with open(self.path / "ops.jsonl", encoding="utf-8") as lines:
            for line in lines:
                if not line.endswith("\n"):
                    break  # the writer died mid-line: that op never happened
                ops.append(json.loads(line))
        return ops

    def last_seq(self) -> int:
        ops = self.ops()
        return ops[-1]["seq"] if ops else 0

    def files_of(self, op: dict[str, Any]) -> list[Path]:
        return [self.path / "files" / str(op["seq"]) / name for name in op.get("files", [])]

    def synced(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "synced.json").read_text())
        except FileNotFoundError:
            return {}

    def mark_synced(self, run_id: str, seq: int) -> None:
        _write_json(self.path / "synced.json", {"run_id": run_id, "seq": seq})

    def unsynced(self) -> list[dict[str, Any]]:
        done = self.synced().get("seq", 0)
        return [op for op in self.ops() if op["seq"] > done]

    def finished(self) -> bool:
        """Every op is in the store and no stage will add more: the spool can go.

        The writer first, then the ops: a stage appends its last op before it releases the
        spool, so once it is seen gone every op it wrote is in the file. Read the other way
        round, an op appended between the two reads would be deleted unsent.
        """
        return not self.writer_alive() and not self.unsynced()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def pending(project: Path, tracking_uri: str | None = None) -> list[Spool]:
    """Spools with work left, oldest first; only those for `tracking_uri` when given."""
    root = spool_root(project)
    if not root.is_dir():
        return []
    spools = []
    for path in root.iterdir():
        if not (path / "run.json").is_file():
            continue
        spool = Spool(path)
        if tracking_uri is None or spool.tracking_uri == tracking_uri:
            spools.append(spool)
    return sorted(spools, key=lambda s: s.meta["spooled_at"])


def count_ops(ops: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> dict[str, int]:
    """How much an op list holds, by kind: what 'tracking is behind' reports."""
    counts = {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "datasets": 0, "models": 0}
    for op in ops:
        kind = op["op"]
        if kind == "metrics":
            counts["metrics"] += len(op["metrics"])
        elif kind == "params":
            counts["params"] += len(op["params"])
        elif kind == "tags":
            counts["tags"] += len(op["tags"])
        elif kind == "artifact":
            counts["artifacts"] += len(op.get("files", []))
        elif kind == "inputs":
            counts["datasets"] += len(op["datasets"])
        elif kind == "model":
            counts["models"] += 1
    return counts


def describe(ops: list[dict[str, Any]]) -> str:
    """`12 metric values, 3 params, 7 artifacts, the model` for a one-line report."""
    counts = count_ops(ops)
    parts = [
        f"{n} {name if n != 1 else name.rstrip('s')}"
        for name, n in (
            ("metric values", counts["metrics"]),
            ("params", counts["params"]),
            ("tags", counts["tags"]),
            ("artifacts", counts["artifacts"]),
            ("datasets", counts["datasets"]),
        )
        if n
    ]
    if counts["models"]:
        parts.append("the model")
    return ", ".join(parts) or f"{len(ops)} status change(s)"
