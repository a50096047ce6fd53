"""A stage's system metrics in its run: CPU, memory, disk, network, and GPU where MLflow finds one,
sampled every `system_metrics.interval_s` seconds (params.yaml; 0: off) by MLflow's own monitors.

MLflow's SystemMetricsMonitor would log them itself, but straight to the store (its
BatchMetricsLogger), and it stops for good at the first `get_run` that fails: offline or in an
outage they would be lost. Here only its samplers are used (its `monitors`, with its GPU detection,
`collect_metrics`, `aggregate_metrics`); a thread of ours publishes each sample through the run's
RunWriter, so the spool keeps them like every other write. tests/test_upstream.py fails when MLflow
changes what this relies on.

Names are MLflow's: `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
...; across hosts each host's series carry its node id, `system/host-1/cpu_utilization_percentage`.
A point's step is its sample's index, its timestamp the time the sample was taken.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from mnist_lstm.errors import one_line
from mnist_lstm.tracking.outage import RunWriter

PREFIX = "system/"
# (step, timestamp in ms, {MLflow's name without the prefix: value}): JSON as it is, so that a
# host of a cluster can hand its samples to the chief.
Sample = tuple[int, int, dict[str, float]]
# How long a stage waits, at its end, for a sample being written (a store that stalls answers
# within MLflow's bounded retries; past this the stage goes on without it).
STOP_TIMEOUT_S = 30.0
# MLflow's monitor is handed a REST store it never contacts: its constructor makes a client for
# the store (a sqlite one would be opened, even offline), and it logs nothing here.
_NO_STORE = "http://127.0.0.1:9"


def node_id(rank: int, hosts: int) -> str | None:
    """Across hosts each host's series carry its rank (`host-0` is the chief); one host: none."""
    return f"host-{rank}" if hosts > 1 else None


def metric_names(values: dict[str, float], node: str | None = None) -> dict[str, float]:
    """`{"cpu_utilization_percentage": 3.0}` as MLflow names it in a run, with the node id."""
    prefix = PREFIX + (f"{node}/" if node else "")
    return {prefix + key: value for key, value in values.items()}


def log_samples(run: RunWriter, samples: list[Sample], node: str | None = None) -> None:
    for step, timestamp, values in samples:
        run.log_metrics(metric_names(values, node), step=step, timestamp=timestamp)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _monitor() -> SystemMetricsMonitor:
    """MLflow's monitor, for its samplers only (CPU, disk, network; a GPU where NVML or ROCm
    answers). Its line saying there is no GPU, on every machine without one, is left out."""
    logger = logging.getLogger("mlflow.system_metrics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return SystemMetricsMonitor(run_id="", tracking_uri=_NO_STORE)
    finally:
        logger.setLevel(level)


class Sampler:
    """Samples the machine every `interval` seconds on a thread of its own, from `start` until
    `stop`, which takes a last sample: each goes to `publish` and is kept in `samples`.

    It never fails or holds up the stage: an error (in a monitor, or a write the run refused)
    is one line and ends sampling; `stop` waits at most STOP_TIMEOUT_S for a write under way."""

    def __init__(
        self,
        interval: float,
        publish: Callable[[Sample], None] | None = None,
        first_step: int = 0,
    ) -> None:
        self.interval = interval
        self.samples: list[Sample] = []
        self._publish = publish
        self._step = first_step
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start sampling; with `interval` 0, nothing."""
        if self.interval <= 0:
            return
        try:
            self._mlflow = _monitor()
        except Exception as err:  # noqa: BLE001 - sampling never fails the stage
            self._fail(err)
            return
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling after one last sample, published before this returns."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            print(
                f"system metrics: the last sample was not written within {STOP_TIMEOUT_S:g} s; "
                "the stage goes on without it",
                flush=True,
            )

    def _loop(self) -> None:
        try:
            # CPU utilization is measured since the previous reading in the same thread (psutil):
            # this one, in the sampler's thread, starts the clock.
            self._mlflow.collect_metrics()
            self._clear()
            while not self._stopping.wait(self.interval):
                self._sample()
            self._sample()
        except Exception as err:  # noqa: BLE001 - sampling never fails the stage
            self._fail(err)

    def _sample(self) -> None:
        taken = _now_ms()
        self._mlflow.collect_metrics()
        sample = (self._step, taken, self._mlflow.aggregate_metrics())
        self._clear()
        self._step += 1
        self.samples.append(sample)
        if self._publish is not None:
            self._publish(sample)

    def _clear(self) -> None:
        for monitor in self._mlflow.monitors:
            monitor.clear_metrics()

    def _fail(self, err: Exception) -> None:
        print(
            f"system metrics: sampling stopped ({one_line(err, default=type(err).__name__)}); "
            "the stage goes on",
            flush=True,
        )


def next_step(run: RunWriter) -> int:
    """The step after the run's last system-metrics point, so that a stage sampling into a run
    that already holds some (evaluate into train's) goes on where they end; 0 if unknown."""
    try:
        if run.deferred:
            steps = [
                op["step"]
                for op in run.spool.ops()
                if op["op"] == "metrics" and any(key.startswith(PREFIX) for key in op["metrics"])
            ]
        else:
            keys = [
                key for key in run.client.get_run(run.run_id).data.metrics if key.startswith(PREFIX)
            ]
            steps = [
                point.step
                for key in keys
                for point in run.client.get_metric_history(run.run_id, key)
            ]
    except Exception:  # noqa: BLE001 - numbering from 0 is the worst that follows
        return 0
    return max(steps, default=-1) + 1


@contextlib.contextmanager
def sampling(
    run: RunWriter | None, interval: float, node: str | None = None, resume: bool = False
) -> Iterator[Sampler]:
    """Sample while the block runs, into `run` when there is one (a host of a cluster other than
    the chief has none: it keeps its samples for the chief). Entered after the run opens, it stops,
    its last sample written, before the run ends: on success, error and Ctrl-C alike. `resume`:
    the run holds earlier samples, continue their steps. `interval` 0: nothing is sampled."""
    publish = None
    if run is not None:
        publish = lambda sample: log_samples(run, [sample], node)  # noqa: E731
    sampler = Sampler(interval, publish, next_step(run) if resume and run and interval else 0)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()
