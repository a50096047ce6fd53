"""Writes that survive an outage: a stage's writes go to the store while it answers and to the
spool (spool.py) once it does not; `make sync`, and every stage before it logs, replays the spool.

The interface the rest of tracking uses: `RunWriter` (every write of a run), `new_run`,
`sync_first`, `claim_spooled_run`, `sync`, `waiting`, `spooled_run_ids`. Every write is an op
(ops.py performs it), so a run synced after an outage holds what it would have held without one.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from mnist_lstm.errors import interrupts_held, one_line
from mnist_lstm.tracking import backlog, spool
from mnist_lstm.tracking.models import log_model
from mnist_lstm.tracking.ops import apply_op
from mnist_lstm.tracking.store import (
    EXPERIMENT,
    TAG_MODEL_MD5,
    TrackingError,
    connect,
    is_outage,
    offline,
    project_root,
    reason,
    refusal,
    run_url,
    tracking_uri,
)

if TYPE_CHECKING:
    from mnist_lstm.runtime import keras

# Which live process owns a RUNNING run: lets the next pipeline spot runs orphaned by `kill -9`.
TAG_PID = "mnist_lstm.pid"
TAG_HOST = "mnist_lstm.host"
# Set on a run created by a sync: a rerun of an interrupted sync finds it instead of a second one.
TAG_SPOOL_ID = "mnist_lstm.spool_id"


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunWriter:
    """Where a stage's writes to its run go: straight to the store while it answers; once a write
    fails because the store is down or unreachable (after MLflow's bounded retries), that write
    and every later one go, in order, to a spool that `make sync` replays. The stage goes on --
    unless the spool cannot be written either (a full disk): that ends it, in one line
    (spool.SpoolError).

    Safe to call from several threads at once (the system-metrics sampler's and the stage's):
    one write at a time, so the ops keep one order and a hand-over to the spool happens once."""

    def __init__(self, run_id: str, spool_: spool.Spool | None = None, why: str = "") -> None:
        self.uri = tracking_uri()
        self.client = mlflow.MlflowClient(self.uri)
        self.run_id = run_id
        self.spool = spool_
        self._why = why
        # The spool refused a write: later ones would fail alike, and must not hide the first.
        self._broken = False
        # Re-entrant: log_model defers (and then writes) while it holds it.
        self._lock = threading.RLock()

    @property
    def deferred(self) -> bool:
        return self.spool is not None

    def _defer(self, err: Exception) -> None:
        """From this write on, everything goes to a new spool; one line says so."""
        if not is_outage(err):
            raise refusal(err, self.uri) or err
        with self._lock:
            self._why = reason(err)
            try:
                self.spool = spool.Spool.create(project_root(), self.uri, self.run_id)
            except spool.SpoolError:
                self._broken = True
                raise
            print(
                f"tracking: {self.uri} stopped answering ({self._why}); the run's remaining "
                f"writes go to {self.spool.path} and the stage goes on",
                flush=True,
            )

    def _write(self, op: dict[str, Any], files: list[tuple[Path, str]] | None = None) -> None:
        files = files or []
        with self._lock:
            if self.spool is None:
                try:
                    apply_op(self.client, self.run_id, op, [source for source, _ in files])
                    return
                except Exception as err:  # noqa: BLE001 - _defer re-raises what is not an outage
                    self._defer(err)
            try:
                self.spool.append(op, files)
            except spool.SpoolError:
                self._broken = True
                raise

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(
        self, metrics: dict[str, float], step: int = 0, timestamp: int | None = None
    ) -> None:
        """`timestamp`: when the values were measured (ms since the epoch), if not now."""
        stamp = _now_ms() if timestamp is None else timestamp
        self._write({"op": "metrics", "metrics": metrics, "step": step, "timestamp": stamp})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        self._write({"op": "artifact", "artifact_path": artifact_path}, [(path, path.name)])

    def log_dict(self, value: dict[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(value, indent=2))
            self.log_artifact(path)

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        self._write({"op": "inputs", "datasets": datasets})

    def log_model(self, model: keras.Model, model_file: Path, input_example: np.ndarray) -> None:
        """The model as an MLflow model; spooled as the model file the stage wrote."""
        with self._lock:
            if self.spool is None:
                try:
                    log_model(model, model_file, input_example, self.run_id)
                    return
                except Exception as err:  # noqa: BLE001 - _defer re-raises what is not an outage
                    self._defer(err)
            with tempfile.TemporaryDirectory() as tmp:
                example = Path(tmp) / "input_example.npy"
                np.save(example, input_example)
                files = [(Path(model_file), "model.keras"), (example, example.name)]
                self._write({"op": "model"}, files)

    def set_status(self, status: str) -> None:
        self._write({"op": "status", "status": status})

    def end(self, status: str) -> None:
        """End the run. Ending a failed or killed stage, a spool that cannot take the write (the
        disk full) is let be: the stage's own error is the one line to say, and a run synced
        without its end is marked FAILED by the next stage, as any run whose process died."""
        try:
            self._write({"op": "end", "status": status, "end_time": _now_ms()})
        except spool.SpoolError:
            if status == "FINISHED":
                raise

    def close(self) -> None:
        """Release the spool to `make sync`, and say in one line how far tracking is behind
        (nothing more after a write the spool refused: the stage's error says it)."""
        if self.spool is None:
            return
        self.spool.release()
        if self._broken:
            return
        behind = backlog.describe(self.spool.unsynced())
        why = f" ({self._why})" if self._why else ""
        print(
            f"tracking: {self.uri} is behind{why}: {behind} of run {self.spool.display_id} wait "
            f"in {self.spool.path}; `make sync` sends them once it answers (the next pipeline "
            "run does it first)",
            flush=True,
        )

    def where(self) -> str:
        """The run in the UI, or where its writes wait."""
        if self.deferred:
            return f"run {self.spool.display_id}, waiting in {self.spool.path} for `make sync`"
        return run_url(self.run_id)


def owner_tags() -> dict[str, str]:
    """Which process on which host writes to a RUNNING run (what fail_orphaned_runs checks)."""
    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}


def new_run(name: str, tags: dict[str, Any], create: dict[str, Any] | None = None) -> RunWriter:
    """Create the run in the store, or (offline, or when the store just went down) in a spool
    that creates it when it syncs. `create` adds how a sync finds an existing run instead."""
    # MLflow keeps tags as text: numbers become text here, at the edge, and nowhere before.
    tags = {key: str(value) for key, value in {**tags, **owner_tags()}.items()}
    spec = {"run_name": name, "start_time": _now_ms(), "tags": tags, **(create or {})}
    why = "MNIST_LSTM_TRACKING=offline"
    if not offline():
        client = mlflow.MlflowClient(tracking_uri())
        try:
            experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
            run = client.create_run(
                experiment_id, start_time=spec["start_time"], tags=tags, run_name=name
            )
            return RunWriter(run.info.run_id)
        except Exception as err:
            if not is_outage(err):
                refused = refusal(err)
                if refused:
                    raise refused from None
                raise
            why = reason(err)
    deferred = spool.Spool.create(project_root(), tracking_uri(), None, spec)
    return RunWriter(deferred.spool_id, deferred, why)


def sync_first() -> None:
    """Before a stage logs anything: replay what earlier stages left in the spool for this store
    (and move aside, in a line each, spools that cannot be read)."""
    root = project_root()
    if spool.pending(root, tracking_uri()) or spool.damaged(root):
        sync(say=lambda line: print(f"tracking: {line}", flush=True), uri=tracking_uri())


def _spooled_run_for_model(model_md5: str) -> spool.Spool | None:
    """The newest spool for this store whose run trained a model file with this md5."""
    found = None
    for candidate in spool.pending(project_root(), tracking_uri()):
        for op in candidate.ops():
            if op["op"] == "tags" and op["tags"].get(TAG_MODEL_MD5) == model_md5:
                found = candidate
    return found


def claim_spooled_run(model_md5: str, store_down: str = "") -> RunWriter | None:
    """The run that trained this model file while its writes still wait in the spool (the store
    down, or offline), claimed for this stage, which goes on writing after them; None when no
    spooled run trained it. A store that answers is first sent what waits."""
    with spool.lock(project_root()):
        if not offline() and not store_down:
            sync_first()
        pending = _spooled_run_for_model(model_md5)
        if pending is None:
            return None
        pending.claim()
    return RunWriter(pending.display_id, pending, store_down)


def spooled_run_ids() -> set[str | None]:
    """The store's ids of runs whose writes wait in the spool: they end when synced."""
    return {s.run_id for s in spool.pending(project_root())}


def _create_spooled_run(client: mlflow.MlflowClient, deferred: spool.Spool) -> str:
    """The store's run for a spool that began without one: found again by its spool id when an
    earlier sync created it, the training run of its model (evaluate offline), or created."""
    spec = deferred.meta["create"]
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for filter_string in (
        f"tags.`{TAG_SPOOL_ID}` = '{deferred.spool_id}'",
        f"tags.`{TAG_MODEL_MD5}` = '{spec['find_model_md5']}'" if "find_model_md5" in spec else "",
    ):
        if not filter_string:
            continue
        runs = client.search_runs(
            [experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs:
            return runs[0].info.run_id
    run = client.create_run(
        experiment_id,
        start_time=spec["start_time"],
        tags={**spec["tags"], TAG_SPOOL_ID: deferred.spool_id},
        run_name=spec["run_name"],
    )
    return run.info.run_id


def _replay(deferred: spool.Spool, check: Callable[[], None]) -> tuple[str, int]:
    """Send a spool's unsynced ops in order, recording each as done; (run id, ops sent)."""
    client = mlflow.MlflowClient(deferred.tracking_uri)
    run_id = deferred.run_id
    sent = 0
    try:
        if run_id is None:
            run_id = _create_spooled_run(client, deferred)
            deferred.mark_synced(run_id, 0)
        for op in deferred.unsynced():
            check()
            apply_op(client, run_id, op, deferred.files_of(op))
            deferred.mark_synced(run_id, op["seq"])
            sent += 1
    except (KeyError, TypeError, ValueError) as err:  # an op that lacks what its kind needs
        raise spool.SpoolDamaged(f"op {sent + 1} cannot be replayed ({one_line(err)})") from None
    return run_id, sent


def _put_aside(deferred: spool.Spool, err: spool.SpoolDamaged, say: Callable[[str], None]) -> None:
    """A spool that cannot be read goes to quarantine, never deleted; one line says where."""
    name = deferred.path.name
    if deferred.writer_alive():
        say(f"spool {name}: cannot be read ({err}); left in {deferred.path} while its stage runs")
        return
    try:
        where = deferred.quarantine(str(err))
    except OSError as moving:  # a full disk, no permission: it stays unsent where it is
        say(
            f"spool {name}: cannot be read ({err}); cannot move it aside either "
            f"({moving.strerror or moving}): left in {deferred.path}, unsent"
        )
        return
    say(
        f"spool {name}: cannot be read ({err}); moved to {where}, unsent: look at it, then "
        "delete it (the other runs sync)"
    )


def sync(say: Callable[[str], None] = print, uri: str | None = None) -> bool:
    """Replay this project's spools (only those for `uri` when given) into their stores, saying a
    line per run before and after; False when work is left undone: a store did not answer (its
    spools stay as they are), or a spool could not be read (moved to quarantine, never deleted;
    without `uri`, `make sync`, also those moved there before).

    Each spool goes only to the store it was written for (spool.py: a run.json edited to another
    is refused, and a spool from before that was recorded only to the store configured now), and
    is checked whole before anything of it is sent. Idempotent and resumable: each op is recorded
    as sent once the store has it, and an op sent twice (a sync killed between the two) changes
    nothing. SIGINT/SIGTERM stop it between two ops (KeyboardInterrupt).
    """
    root = project_root()
    complete = True
    with spool.lock(root), interrupts_held() as check:
        if uri is None:
            for aside in spool.quarantined(root):
                complete = False
                say(f"spool {aside.name}: unreadable, waits in {aside}: look at it, then delete it")
        for deferred, err in spool.damaged(root):
            complete = False
            _put_aside(deferred, err, say)
        for deferred in spool.pending(root, uri):
            if not deferred.path.is_dir():
                continue  # removed by a sync that held the lock before us
            try:
                deferred.verify()
                todo = deferred.unsynced()
            except spool.SpoolDamaged as err:  # changed since it was listed
                complete = False
                _put_aside(deferred, err, say)
                continue
            store = deferred.tracking_uri
            if not deferred.bound and store != tracking_uri():
                complete = False
                say(
                    f"run {deferred.display_id}: its spool predates the record of its store, so "
                    f"it goes only to the store configured now; to send it to {store}, run "
                    f"`MLFLOW_TRACKING_URI={store} make sync`"
                )
                continue
            if todo:
                say(f"run {deferred.display_id}: sending {backlog.describe(todo)} to {store}")
            try:
                connect(uri=store, attempts=1)
                run_id, _ = _replay(deferred, check)
            except spool.SpoolDamaged as err:
                complete = False
                _put_aside(deferred, err, say)
                continue
            except spool.SpoolError as err:
                complete = False
                say(f"run {deferred.display_id}: not synced: {err}")
                continue
            except (TrackingError, MlflowException, OSError) as err:
                complete = False
                refused = err if isinstance(err, TrackingError) and err.refused else refusal(err)
                if refused:
                    say(f"run {deferred.display_id}: not synced: {refused}")
                elif isinstance(err, TrackingError) or is_outage(err):
                    why = err.reason if isinstance(err, TrackingError) else reason(err)
                    say(
                        f"run {deferred.display_id}: not synced, {store} does not answer "
                        f"({why}); `make sync` again once it does"
                    )
                else:  # e.g. the run was deleted there: nothing to retry, nothing to throw away
                    say(
                        f"run {deferred.display_id}: {store} refused a write ({reason(err)}); "
                        f"the rest stays in {deferred.path}"
                    )
                continue
            if deferred.finished():
                deferred.remove()
                say(f"run {run_id}: in sync with {store}")
            else:
                say(f"run {run_id}: sent what there was; its stage is still writing")
    return complete


def waiting() -> list[str]:
    """A line per run with writes waiting in this project's spool (for `make lineage`), and per
    spool that cannot be read."""
    root = project_root()
    return [
        *(
            f"run {s.display_id}: {backlog.describe(s.unsynced())} wait for {s.tracking_uri}"
            + (" (its stage is still writing)" if s.writer_alive() else " (`make sync`)")
            for s in spool.pending(root)
        ),
        *(
            f"spool {s.path.name}: cannot be read ({err}); `make sync` moves it to quarantine"
            for s, err in spool.damaged(root)
        ),
        *(
            f"spool {path.name}: could not be read, waits in {path}"
            for path in spool.quarantined(root)
        ),
    ]
