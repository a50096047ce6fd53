"""The tracking spool: MLflow writes the store could not take yet, kept on disk, in order, until
`make sync` (`python -m mnist_lstm.sync`) or the next pipeline run replays them.

Hand-written machinery with no mlflow in it: outage.py says what each op means and how it is
replayed; this module keeps ops durable, ordered, replayed once, and safe to interrupt.

    <project>/.tracking-spool/<uuid>-<binding>/
        run.json     where the ops belong: the tracking URI, and the store's run id, or what it
                     takes to create the run there (offline, or a store that was down at start)
        ops.jsonl    one op a line: {"seq": n, "op": ..., ...}; a torn last line is ignored, and
                     cut off before the next append, so an op never glues onto half of another
        files/<n>/   copies of the files op n logs (artifacts, the model); plain names only
        synced.json  {"run_id": ..., "seq": the last op the store has}
        writer.json  {"pid": ..., "host": ...} while a stage is writing to it
    <project>/.tracking-spool/quarantine/<spool id>   a spool that could not be read, moved aside

<binding> is a digest of the URI and run id run.json was written with: a run.json edited to
another store or run no longer matches its folder's name, and the spool is refused. (It is no
signature: whoever can write the spool can rename it too. It stops a spool from being sent,
by mistake or by an edit of one file, anywhere but where it was written for.)

A spool whose ops are all in the store and which no live stage writes to is removed; one that
cannot be read (`SpoolDamaged`) is moved to quarantine/, never deleted. A write the disk refuses
(full) is a `SpoolError`, one line, with the spool left as readable as before it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

from mnist_lstm.contracts import fsync_dir, replace_durably, write_failure
from mnist_lstm.errors import UserError, one_line

SPOOL_DIR = ".tracking-spool"
QUARANTINE = "quarantine"
OP_KINDS = frozenset({"params", "tags", "metrics", "artifact", "inputs", "model", "status", "end"})
# A spool folder's name: a uuid, and from 2026-11-30 on the binding to its store and run.
_SPOOL_NAME = re.compile(r"^([0-9a-f]{32})(?:-([0-9a-f]{16}))?$")


class SpoolError(UserError):
    """The spool cannot be written (a full disk): the stage stops in one line; what the spool
    held before stays readable for `make sync`."""


class SpoolDamaged(Exception):
    """A spool that cannot be replayed as written: a line that is not an op, a run.json that is
    unreadable or not its folder's, a file name that leaves the spool."""


def _binding(tracking_uri: str, run_id: str | None) -> str:
    return hashlib.sha256(json.dumps([tracking_uri, run_id]).encode()).hexdigest()[:16]


def _spool_failure(path: Path, err: OSError) -> SpoolError:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    return SpoolError(
        f"tracking spool: cannot write {path}: {write_failure(err)}; "
        f"{'free space on that disk' if full else 'fix that'} and rerun the stage (what the "
        "spool held before stays for `make sync`)"
    )


def check_name(name: object) -> str:
    """A file name an op may log: one plain path component, so it stays in files/<seq>/."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(sep in name for sep in ("/", "\0", os.sep, os.altsep or "/"))
        or os.path.isabs(name)
        or os.path.splitdrive(name)[0]  # Windows' `C:name` leaves the folder it is joined to
    ):
        raise SpoolDamaged(f"file name {name!r} is not a plain name inside the spool")
    return name


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
    """Atomic and durable: a reader, even after a crash, sees the old content or the new, never
    half of it; a full disk is a SpoolError and leaves the old content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(value, sort_keys=True))
        replace_durably(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _spool_failure(path, err) from None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _cut_torn_line(fd: int) -> int:
    """Cut the file back to its last newline (a writer that died, or a disk that filled,
    mid-line); the new size."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 4096)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = os.read(fd, end - start)  # os.pread is POSIX-only
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
    return end


class Spool:
    """One run's deferred ops."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # The last seq this object appended (one writer at a time: `claim`); read from the file
        # once, not on every write of a 10-epoch run's ~40 ops.
        self._seq: int | None = None
        self._meta: dict[str, Any] | None = None

    @classmethod
    def create(
        cls,
        project: Path,
        tracking_uri: str,
        run_id: str | None,
        create: dict[str, Any] | None = None,
    ) -> Spool:
        spool_id = f"{uuid.uuid4().hex}-{_binding(tracking_uri, run_id)}"
        path = spool_root(project) / spool_id
        try:
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
            fsync_dir(path.parent)
        except (OSError, SpoolError) as err:
            shutil.rmtree(path, ignore_errors=True)  # half made: nothing in it yet
            if isinstance(err, OSError):
                raise _spool_failure(path, err) from None
            raise
        return spool

    # --- identity ---

    @property
    def spool_id(self) -> str:
        return self.path.name

    @property
    def meta(self) -> dict[str, Any]:
        """run.json, checked (SpoolDamaged otherwise); read once: it never changes."""
        if self._meta is None:
            self._meta = self._read_meta()
        return self._meta

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError) as err:
            raise SpoolDamaged(f"run.json is unreadable ({one_line(err)})") from None
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("tracking_uri"), str)
            and isinstance(meta.get("run_id"), str | None)
            and isinstance(meta.get("create"), dict | None)
            and (meta["run_id"] is not None or meta["create"] is not None)
            and isinstance(meta.get("spooled_at"), int | float)
        ):
            raise SpoolDamaged("run.json lacks the tracking URI, run and time it must hold")
        name = _SPOOL_NAME.match(self.path.name)
        if name is None or meta.get("spool_id") != self.path.name:
            raise SpoolDamaged(f"run.json belongs to spool {meta.get('spool_id')!r}, not this one")
        if name.group(2) and name.group(2) != _binding(meta["tracking_uri"], meta["run_id"]):
            raise SpoolDamaged(
                f"run.json names a store or run ({meta['tracking_uri']}, run "
                f"{meta['run_id']}) other than the one this spool was written for"
            )
        return meta

    @property
    def bound(self) -> bool:
        """Whether the folder's name binds run.json (spools from before 2026-11-30: not)."""
        name = _SPOOL_NAME.match(self.path.name)
        return bool(name and name.group(2))

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
        """Add an op; `files` are (source, name) pairs copied in first. Durable on return.

        A disk that fills meanwhile is a SpoolError, and the spool is left as it was: the op's
        files removed, its half line cut off (and a half line left by a crash is cut off before
        this op is written, so the two never glue into one unreadable line)."""
        seq = (self.last_seq() if self._seq is None else self._seq) + 1
        copies = self.path / "files" / str(seq)
        names = [check_name(name) for _, name in files]
        target = copies
        try:
            for source, name in files:
                copies.mkdir(parents=True, exist_ok=True)
                target = copies / name
                shutil.copyfile(source, target)
                with open(target, "rb+") as copied:
                    os.fsync(copied.fileno())
            if names:
                fsync_dir(copies)
                fsync_dir(copies.parent)
            line = json.dumps({**op, "seq": seq, "files": names}, sort_keys=True) + "\n"
            target = self.path / "ops.jsonl"
            # Bytes as written: Windows' os.open would otherwise turn each \n into \r\n.
            fd = os.open(target, os.O_RDWR | getattr(os, "O_BINARY", 0))
            try:
                end = _cut_torn_line(fd)
                os.lseek(fd, end, os.SEEK_SET)
                try:
                    _write_all(fd, line.encode())
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, end)  # needs no space: the half line goes
                    raise
            finally:
                os.close(fd)
        except OSError as err:
            shutil.rmtree(copies, ignore_errors=True)
            raise _spool_failure(target, err) from None
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
        """Every whole op, checked (SpoolDamaged otherwise); a torn last line never happened."""
        try:
            lines = (self.path / "ops.jsonl").read_bytes().split(b"\n")
        except OSError as err:
            raise SpoolDamaged(f"ops.jsonl is unreadable ({one_line(err)})") from None
        ops: list[dict[str, Any]] = []
        for number, line in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline
            try:
                op = json.loads(line)
            except ValueError:
                raise SpoolDamaged(f"ops.jsonl line {number} is not an op") from None
            if not (
                isinstance(op, dict)
                and op.get("op") in OP_KINDS
                and isinstance(op.get("seq"), int)
                and op["seq"] > (ops[-1]["seq"] if ops else 0)
                and isinstance(op.get("files", []), list)
            ):
                raise SpoolDamaged(f"ops.jsonl line {number} is not an op in sequence")
            for name in op.get("files", []):
                check_name(name)
            ops.append(op)
        return ops

    def last_seq(self) -> int:
        ops = self.ops()
        return ops[-1]["seq"] if ops else 0

    def files_of(self, op: dict[str, Any]) -> list[Path]:
        """The op's files, each a regular file inside files/<seq>/ with no symlink on the way
        (SpoolDamaged otherwise): a spool never uploads a file from anywhere else."""
        inside = os.path.join(os.path.realpath(self.path), "files", str(op["seq"]))
        paths = []
        for name in op.get("files", []):
            path = self.path / "files" / str(op["seq"]) / check_name(name)
            real = os.path.realpath(path)
            if real != os.path.join(inside, name) or not path.is_file():
                raise SpoolDamaged(f"op {op['seq']}'s file {name!r} is not a file inside the spool")
            paths.append(path)
        return paths

    def verify(self) -> None:
        """Raise SpoolDamaged unless run.json, every op and every file can be replayed as
        written; nothing is sent from a spool before it passes."""
        self._meta = None  # read again: a sync checks the spool as it is now
        if self.path.is_symlink():
            raise SpoolDamaged("the spool is a symlink to somewhere else")
        self.meta  # noqa: B018 - reading it checks it
        for op in self.ops():
            self.files_of(op)

    def synced(self) -> dict[str, Any]:
        try:
            synced = json.loads((self.path / "synced.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise SpoolDamaged(f"synced.json is unreadable ({one_line(err)})") from None
        if not (isinstance(synced, dict) and isinstance(synced.get("seq"), int)):
            raise SpoolDamaged("synced.json does not say which op was sent last")
        return synced

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

    def quarantine(self, why: str) -> Path:
        """Move the spool aside, never deleting it, with `why` beside it; where it went."""
        aside = self.path.parent / QUARANTINE
        aside.mkdir(exist_ok=True)
        target = aside / self.path.name
        for n in range(1, 1000):
            if not os.path.lexists(target):
                break
            target = aside / f"{self.path.name}.{n}"
        os.rename(self.path, target)
        fsync_dir(aside)
        fsync_dir(self.path.parent)
        self.path = target
        try:  # a note for whoever looks; the move itself is what matters
            target.with_name(f"{target.name}.why").write_text(why + "\n")
        except OSError:
            pass
        return target


def _spools(project: Path) -> tuple[list[Spool], list[tuple[Spool, SpoolDamaged]]]:
    """This project's spools: those that can be replayed, and the damaged ones with why."""
    root = spool_root(project)
    if not root.is_dir():
        return [], []
    good, damaged = [], []
    for path in root.iterdir():
        if path.name == QUARANTINE or not (path / "run.json").is_file():
            continue  # quarantine, or a spool being created (run.json comes last)
        spool = Spool(path)
        try:
            spool.verify()
        except SpoolDamaged as err:
            damaged.append((spool, err))
            continue
        good.append(spool)
    return good, damaged


def pending(project: Path, tracking_uri: str | None = None) -> list[Spool]:
    """Spools with work left that can be replayed, oldest first; only those for `tracking_uri`
    when given. Damaged ones are `damaged`'s."""
    spools = [
        spool
        for spool in _spools(project)[0]
        if tracking_uri is None or spool.tracking_uri == tracking_uri
    ]
    return sorted(spools, key=lambda s: s.meta["spooled_at"])


def damaged(project: Path) -> list[tuple[Spool, SpoolDamaged]]:
    """Spools that cannot be replayed as written, with why (`Spool.quarantine` moves them)."""
    return _spools(project)[1]


def quarantined(project: Path) -> list[Path]:
    """Spools moved aside by an earlier sync, oldest first."""
    aside = spool_root(project) / QUARANTINE
    if not aside.is_dir():
        return []
    found = [path for path in aside.iterdir() if path.is_dir() and not path.is_symlink()]
    return sorted(found, key=lambda path: path.stat().st_mtime)
