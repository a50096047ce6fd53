"""Which devices train: one by default, a MirroredStrategy over several GPUs (or logical CPUs),
a MultiWorkerMirroredStrategy over several hosts when TF_CONFIG names them.

`MNIST_LSTM_CPU_DEVICES=N` splits the CPU into N logical devices before TensorFlow touches one, so
multi-device training runs (and is tested) on a machine without a second device.

`TF_CONFIG` is TensorFlow's own cluster spec, set on every host (docs/team.md), e.g.
`{"cluster": {"worker": ["10.0.0.2:2222", "10.0.0.3:2222"]},
  "task": {"type": "worker", "index": 0}}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mnist_lstm.errors import UserError
from mnist_lstm.params import TrainParams
from mnist_lstm.runtime import tf

# Splits the CPU into N logical devices: multi-device training, testable without a second device.
CPU_DEVICES_ENV = "MNIST_LSTM_CPU_DEVICES"
TF_CONFIG_ENV = "TF_CONFIG"
# The roles MultiWorkerMirroredStrategy trains with (`ps`, `evaluator`: other strategies').
TRAINING_JOBS = ("chief", "worker")
_EXAMPLE = (
    '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
)


def split_cpu(env: Mapping[str, str]) -> None:
    """Honour MNIST_LSTM_CPU_DEVICES=N before TensorFlow touches a device."""
    value = env.get(CPU_DEVICES_ENV)
    if value is None:
        return
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{CPU_DEVICES_ENV} must be a whole number >= 1, got {value!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(int(value))]
    )


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
        else:
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            how = f"failed ({lines[-1][:160] if lines else 'no message'})"
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


def strategy_for(params: TrainParams, cluster: Cluster | None = None) -> tf.distribute.Strategy:
    """With `distribute: auto`: over several hosts (TF_CONFIG), a MultiWorkerMirroredStrategy;
    over more than one local device (GPUs, else logical CPUs), a MirroredStrategy -- a model
    replica per device, gradients all-reduced every step. Otherwise TensorFlow's default, one
    device."""
    if cluster is not None and cluster.size > 1:
        if params.distribute == "off":
            raise UserError(
                f"{TF_CONFIG_ENV} names {cluster.size} hosts but train.distribute is off: set it "
                f"to auto to train across them, or unset {TF_CONFIG_ENV} on this host"
            )
        # TensorFlow reads TF_CONFIG itself (TFConfigClusterResolver) and starts this host's
        # server; each host's replicas (one per local device) join one all-reduce ring.
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
        d.name for d in tf.config.list_logical_devices("CPU")
    ]
    if params.distribute == "off" or len(devices) < 2:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices)
