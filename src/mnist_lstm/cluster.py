"""Which hosts train together and how they meet: TensorFlow's cluster spec (`TF_CONFIG`) read
and checked, and the pure-Python side of a cluster -- naming a host, a lost one, one that never
came, or hosts that disagree -- without TensorFlow, so that the formation watchdog
(`python -m mnist_lstm.cluster`, started by `formation_bound`) runs in a process of its own in a
few milliseconds. distributed.py does the training across hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psutil

from mnist_lstm.errors import UserError, one_line

TF_CONFIG_ENV = "TF_CONFIG"
# The roles MultiWorkerMirroredStrategy trains with (`ps`, `evaluator`: other strategies').
TRAINING_JOBS = ("chief", "worker")
_EXAMPLE = (
    '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
)
# How long a host waits for the others to join before it gives up (seconds). Hosts are started by
# hand, one after another, and a worker runs `dvc repro normalize` first: minutes, not hours.
# An environment variable, not a param: how long to wait changes no model (and no run-cache key).
CLUSTER_TIMEOUT_ENV = "MNIST_LSTM_CLUSTER_TIMEOUT"
DEFAULT_CLUSTER_TIMEOUT = 300.0


@dataclass(frozen=True)
class Cluster:
    """The hosts TF_CONFIG names, chief first, and which of them this process is."""

    hosts: tuple[str, ...]
    rank: int
    workers: int  # how many of the hosts are `worker` tasks (the rest: the `chief`)

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def is_chief(self) -> bool:
        """The `chief` task, else worker 0: the one host that writes outputs and logs the run
        (TensorFlow's own rule for who saves)."""
        return self.rank == 0

    def describe(self, rank: int | None = None) -> str:
        rank = self.rank if rank is None else rank
        return f"host {rank} ({self.hosts[rank]})"

    def failure(self, message: str) -> str:
        """One line for TensorFlow's error when the cluster broke mid-training: which host went
        silent and how (the coordination service's heartbeat report, or a refused connection to
        its address) and what to do."""
        # The silent host: the heartbeat report's, else the remote target's, else the address
        # named (never this host's own, which the failed op's device names too).
        task = re.search(r"unhealthy.*?/job:(chief|worker)/replica:\d+/task:(\d+)", message, re.S)
        task = task or re.search(
            r"remote target /job:(chief|worker)/replica:\d+/task:(\d+)", message
        )
        others = [host for rank, host in enumerate(self.hosts) if rank != self.rank]
        address = next((host for host in others if host in message), None)
        if task:
            kind, index = task.group(1), int(task.group(2))
            rank = index if kind == "chief" else self.size - self.workers + index
        else:
            rank = self.hosts.index(address) if address else None
        if "unhealthy" in message:
            how = "stopped answering (no heartbeat)"
        elif "Connection refused" in message:
            how = "refused the connection (its training is gone)"
        elif "Connection reset" in message:
            how = "closed the connection (its training is gone)"
        else:
            how = f"failed ({one_line(message, last=True, limit=160, default='no message')})"
        who = self.describe(rank) if rank is not None else "a host"
        return (
            f"training across {self.size} hosts: {who} {how}; steps cannot go on without it, "
            "nothing was written: start train again on every host"
        )


def cluster_from(env: Mapping[str, str]) -> Cluster | None:
    """The cluster TF_CONFIG names; None without TF_CONFIG. A malformed spec is a one-line error
    here, before TensorFlow starts a server with it."""
    raw = env.get(TF_CONFIG_ENV, "").strip()
    if not raw:
        return None

    def bad(what: str) -> UserError:
        return UserError(
            f"{TF_CONFIG_ENV}: {what}; expected TensorFlow's cluster spec, e.g. {_EXAMPLE}"
        )

    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise bad(f"not JSON ({err.msg} at character {err.pos})") from None
    cluster, task = (spec.get("cluster"), spec.get("task")) if isinstance(spec, dict) else (0, 0)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise bad('it needs a "cluster" and a "task" object')
    others = sorted(set(cluster) - set(TRAINING_JOBS))
    if others:
        raise bad(f"job(s) {', '.join(others)} are not for this strategy (only chief and worker)")
    jobs = {job: cluster.get(job, []) for job in TRAINING_JOBS}
    if len(jobs["chief"]) > 1 or not all(
        isinstance(hosts, list) and all(isinstance(h, str) and ":" in h for h in hosts)
        for hosts in jobs.values()
    ):
        raise bad('"chief" is at most one "host:port", "worker" a list of them')
    hosts = tuple(jobs["chief"] + jobs["worker"])
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in TRAINING_JOBS or not isinstance(index, int):
        raise bad(f'task type must be "chief" or "worker" with an integer index, got {task}')
    if not 0 <= index < len(jobs[kind]):
        raise bad(f"task {kind} {index} is not in the cluster ({len(jobs[kind])} {kind} task(s))")
    rank = index if kind == "chief" else len(jobs["chief"]) + index
    return Cluster(hosts=hosts, rank=rank, workers=len(jobs["worker"]))


def cluster_timeout(env: Mapping[str, str]) -> float:
    raw = env.get(CLUSTER_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CLUSTER_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"{CLUSTER_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return seconds


def absent(cluster: Cluster, timeout: float = 2.0) -> list[int]:
    """The other hosts whose TensorFlow server does not take a connection: never started (or
    not reachable). A host that takes it has at least started train."""
    missing = []
    for rank, address in enumerate(cluster.hosts):
        if rank == cluster.rank:
            continue
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError:
            missing.append(rank)
    return missing


def never_came(cluster: Cluster, timeout: float, missing: list[int]) -> str:
    """One line for a cluster that did not form in time, naming the hosts that never came."""
    if missing:
        who = ", ".join(cluster.describe(rank) for rank in missing)
        verb = "never came" if len(missing) == 1 else "never came (none of them)"
        what = f"{who} {verb}"
    else:
        what = "every host answers but the cluster did not form (do they share one TF_CONFIG?)"
    restored = (
        " (if the chief's `dvc repro` restored train from DVC's run-cache, there is nothing "
        "to train)"
        if 0 in missing
        else ""
    )
    return (
        f"training across {cluster.size} hosts: {what} within {timeout:g} s"
        f" ({CLUSTER_TIMEOUT_ENV}); nothing was trained or written: start train on every host "
        f"with the same {TF_CONFIG_ENV}{restored}"
    )


@contextlib.contextmanager
def formation_bound(cluster: Cluster, timeout: float) -> Iterator[None]:
    """Forming the cluster within `timeout` seconds, else one line and the process ends.

    TensorFlow blocks in C++ until every host has joined (the coordination leader forever, the
    others until their registration times out), holding Python's GIL: no thread of this process
    runs meanwhile, and no signal handler. A watchdog process (this module's `main`, with no
    TensorFlow in it) waits on a pipe; when the block exits the pipe closes and it leaves. When the
    time is up first, it names the hosts that never came and kills this process (SIGKILL: exit
    status 137 from a shell): nothing is open or written yet, train has not begun.
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "mnist_lstm.cluster", str(os.getpid()), str(timeout)],
        stdin=subprocess.PIPE,
    )
    try:
        yield
    finally:
        watchdog.stdin.close()
        watchdog.wait()


def main(argv: list[str] | None = None) -> int:
    """The watchdog: `python -m mnist_lstm.cluster PID TIMEOUT`, TF_CONFIG in its environment."""
    parent, timeout = argv or sys.argv[1:]
    # Ctrl-C reaches the whole process group: train handles it; this one leaves with the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cluster = cluster_from(os.environ)
    # The pipe closes when the cluster formed or the parent is gone. Read by a thread: select()
    # takes no pipe on Windows.
    closed = threading.Event()
    # (os.read, not sys.stdin: a daemon thread blocked in a buffered reader fails the exit.)
    fd = sys.stdin.fileno()
    threading.Thread(target=lambda: (os.read(fd, 1), closed.set()), daemon=True).start()
    if closed.wait(float(timeout)) or cluster is None:
        return 0
    line = never_came(cluster, float(timeout), absent(cluster))
    if closed.is_set():  # formed while the hosts were probed
        return 0
    print(f"error: {line}", file=sys.stderr, flush=True)
    with contextlib.suppress(psutil.Error):
        psutil.Process(int(parent)).kill()
    return 0


def disagreement(
    cluster: Cluster, names: Mapping[tuple[int, int], str], tables: list[dict[tuple, tuple]]
) -> str | None:
    """The first host (by rank) whose table differs from the chief's, as one line naming the keys
    (those this host knows by name), or None when every host agrees. `tables[rank]` maps each
    key's digest to its value's digest."""
    chief = tables[0]
    for rank, table in enumerate(tables[1:], start=1):
        keys = [key for key in {*chief, *table} if chief.get(key) != table.get(key)]
        if not keys:
            continue
        # This host knows its own keys by name; another host's extra key only by its digest.
        named = sorted(dict.fromkeys(names.get(key, "a key only one of them has") for key in keys))
        shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        return (
            f"training across {cluster.size} hosts: {cluster.describe(rank)} differs from the "
            f"chief ({cluster.describe(0)}) in {shown}; every host needs the same commit, params "
            "and data (set params in params.yaml and commit, not `-S` on one host): nothing was "
            "trained"
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
