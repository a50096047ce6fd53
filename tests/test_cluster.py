"""TF_CONFIG, TensorFlow's cluster spec: which hosts train together, which one writes, and how
they are told apart when they disagree, get lost or never come."""

from __future__ import annotations

import json
import os

import pytest

from mnist_lstm.cluster import Cluster, cluster_from
from mnist_lstm.errors import UserError

HOSTS = ["10.0.0.2:2222", "10.0.0.3:2222", "10.0.0.4:2222"]


def tf_config(cluster: dict, kind: str, index: int) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})}


def test_no_tf_config_is_one_host():
    assert cluster_from({}) is None
    assert cluster_from({"TF_CONFIG": "  "}) is None


def test_worker_zero_is_the_chief_when_there_is_no_chief_task():
    first = cluster_from(tf_config({"worker": HOSTS}, "worker", 0))
    third = cluster_from(tf_config({"worker": HOSTS}, "worker", 2))
    assert first == Cluster(hosts=tuple(HOSTS), rank=0, workers=3) and first.is_chief
    assert third.rank == 2 and not third.is_chief and third.size == 3
    assert third.describe() == "host 2 (10.0.0.4:2222)"


def test_a_chief_task_comes_first_and_workers_after_it():
    spec = {"chief": HOSTS[:1], "worker": HOSTS[1:]}
    chief = cluster_from(tf_config(spec, "chief", 0))
    worker = cluster_from(tf_config(spec, "worker", 0))
    assert chief.is_chief and chief.hosts == tuple(HOSTS)
    assert worker.rank == 1 and not worker.is_chief


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{'cluster': 1}", "not JSON"),
        (json.dumps({"cluster": {"worker": HOSTS}}), 'needs a "cluster" and a "task"'),
        (json.dumps({"cluster": {"ps": HOSTS}, "task": {"type": "ps", "index": 0}}), "ps"),
        (json.dumps({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker"}}), "host:port"),
        (json.dumps({"cluster": {"worker": HOSTS}, "task": {"type": "worker", "index": 3}}),
         "task worker 3 is not in the cluster (3 worker task(s))"),
        (json.dumps({"cluster": {"worker": HOSTS}, "task": {"type": "boss", "index": 0}}),
         'task type must be "chief" or "worker"'),
    ],
)  # fmt: skip
def test_a_malformed_tf_config_is_one_line_naming_it(raw, says):
    with pytest.raises(UserError) as err:
        cluster_from({"TF_CONFIG": raw})
    message = str(err.value)
    assert message.startswith("TF_CONFIG: ") and says in message
    assert '"task": {"type": "worker", "index": 0}' in message  # the example to copy
    assert "\n" not in message


# What TensorFlow 2.21 raised in the surviving host when the other was killed (trimmed).
HEARTBEAT = """Graph execution error:

Detected at node CollectiveReduceV2 defined at (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main

Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are \
unhealthy (stopped sending heartbeats):
/job:worker/replica:0/task:1
The tasks have crashed. Check the task logs for an earlier error.
  [[{{node CollectiveReduceV2}}]] [Op:__inference_multi_step_on_iterator_1523]"""
REFUSED = """{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/replica:0/task:0/\
device:CPU:0}} failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.3:2222: \
Failed to connect to remote host: Connection refused"""


def test_a_lost_host_is_named_with_how_it_was_lost():
    survivor = Cluster(hosts=tuple(HOSTS[:2]), rank=0, workers=2)
    assert survivor.failure(HEARTBEAT) == (
        "training across 2 hosts: host 1 (10.0.0.3:2222) stopped answering (no heartbeat); steps "
        "cannot go on without it, nothing was written: start train again on every host"
    )
    # Its own device is named in the op too: the lost host is the other one.
    assert "host 1 (10.0.0.3:2222) refused the connection" in survivor.failure(REFUSED)
    assert "a host failed (something else)" in survivor.failure("Some\n\nsomething else")


def test_only_an_error_while_fitting_is_taken_for_a_lost_host():
    """After fit the chief saves and logs alone: an error there is reported as what it is."""
    from mnist_lstm.distributed import cluster_failures
    from mnist_lstm.runtime import tf

    cluster = Cluster(hosts=tuple(HOSTS[:2]), rank=0, workers=2)
    with pytest.raises(UserError, match="host 1 .* stopped answering"):
        with cluster_failures(cluster, while_fitting=lambda: True):
            raise tf.errors.UnavailableError(None, None, HEARTBEAT)
    with pytest.raises(tf.errors.UnavailableError):
        with cluster_failures(cluster, while_fitting=lambda: False):
            raise tf.errors.UnavailableError(None, None, HEARTBEAT)


def test_make_worker_runs_the_train_stage_command():
    """The other hosts of a cluster run exactly what `dvc repro` runs on the chief."""
    import re
    import shlex

    import yaml

    from conftest import REPO

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    recipe = re.search(r"^worker:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    lines = recipe.group(1).replace("\\\n", " ").splitlines()
    assert [line.strip() for line in lines][0] == "dvc repro normalize"
    assert shlex.split(lines[1]) == shlex.split(stage)


def test_any_other_tensorflow_error_while_fitting_is_what_it_is():
    """Only a host going away (Unavailable, Aborted, Cancelled, DeadlineExceeded) is a lost host:
    a shape mismatch between hosts, say, is not reported as one."""
    from mnist_lstm.distributed import cluster_failures
    from mnist_lstm.runtime import tf

    cluster = Cluster(hosts=tuple(HOSTS[:2]), rank=0, workers=2)
    with pytest.raises(tf.errors.InvalidArgumentError):
        with cluster_failures(cluster, while_fitting=lambda: True):
            raise tf.errors.InvalidArgumentError(None, None, "Shape mismatch in the collective")
    for lost in (tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.DeadlineExceededError):
        with pytest.raises(UserError, match="host 1 .* refused the connection"):
            with cluster_failures(cluster, while_fitting=lambda: True):
                raise lost(None, None, REFUSED)


def test_the_lost_host_errors_are_the_classes_tensorflow_raises_for_a_peer_gone():
    """LOST_HOST_ERRORS names classes; TensorFlow raises by status code (gRPC's, absl's), through
    its table of code -> class. The classes must be the ones it raises for those four codes."""
    from tensorflow.python.framework import errors_impl  # the table TensorFlow raises from

    from mnist_lstm.distributed import LOST_HOST_ERRORS
    from mnist_lstm.runtime import tf

    gone = {tf.errors.UNAVAILABLE, tf.errors.ABORTED, tf.errors.CANCELLED}
    gone.add(tf.errors.DEADLINE_EXCEEDED)
    assert {errors_impl.exception_type_from_error_code(code) for code in gone} == set(
        LOST_HOST_ERRORS
    )
    assert {kind(None, None, "lost").error_code for kind in LOST_HOST_ERRORS} == gone
    # A shape mismatch, a failed check: TensorFlow's other errors are no lost host.
    for code in (tf.errors.INVALID_ARGUMENT, tf.errors.INTERNAL, tf.errors.UNKNOWN):
        assert not issubclass(errors_impl.exception_type_from_error_code(code), LOST_HOST_ERRORS)


def test_a_real_tensorflow_error_that_is_no_lost_host_is_what_it_is():
    """An error TensorFlow itself raises from a failing op, not one made up here."""
    from mnist_lstm.distributed import cluster_failures
    from mnist_lstm.runtime import tf

    cluster = Cluster(hosts=tuple(HOSTS[:2]), rank=0, workers=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="shapes of the replicas differ"):
        with cluster_failures(cluster, while_fitting=lambda: True):
            tf.debugging.assert_equal(
                tf.constant([1, 2]), tf.constant([1, 3]), message="shapes of the replicas differ"
            )


# In a process of its own: an aborted collective cannot run again in the process that aborted it
# ("Restart your program to reset"), and tests after this one use collectives.
ABORTED_COLLECTIVE = """
import json, sys, threading
from mnist_lstm.cluster import Cluster
from mnist_lstm.distributed import cluster_failures
from mnist_lstm.errors import UserError
from mnist_lstm.runtime import tf
from tensorflow.python.eager import context

caught = {}

def member():  # one of the two members of an all-reduce: it waits for the other
    try:
        with tf.device("/CPU:0"):
            tf.raw_ops.CollectiveReduceV2(
                input=tf.constant([1.0]), group_size=tf.constant(2), group_key=tf.constant(1),
                instance_key=tf.constant(1), ordering_token=[], merge_op="Add", final_op="Id")
    except Exception as err:
        caught["err"] = err

waiting = threading.Thread(target=member)
waiting.start()
waiting.join(2)
# What the coordination service does on the survivor when a peer's heartbeats stop.
context.context().abort_collective_ops(tf.errors.UNAVAILABLE, sys.argv[1])
waiting.join(60)
err = caught["err"]
try:
    with cluster_failures(Cluster(hosts=tuple(sys.argv[2:]), rank=0, workers=2), lambda: True):
        raise err
except UserError as lost:
    line = str(lost)
print(json.dumps({"type": type(err).__name__, "message": err.message, "line": line}))
"""
HEARTBEAT_REPORT = (
    "The following tasks are unhealthy (stopped sending heartbeats):\n"
    "/job:worker/replica:0/task:1\n"
    "The tasks have crashed. Check the task logs for an earlier error."
)


def test_a_collective_tensorflow_aborts_for_a_lost_peer_names_that_host():
    """A real all-reduce, waiting for a peer, aborted the way TensorFlow aborts it when the
    peer's heartbeats stop: the error TensorFlow raises (its class, its wrapping of the report)
    is the one `cluster_failures` turns into the line naming the host."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", ABORTED_COLLECTIVE, HEARTBEAT_REPORT, *HOSTS[:2]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    raised = json.loads(result.stdout.splitlines()[-1])
    assert raised["type"] == "UnavailableError"
    assert "Collective ops is aborted by: The following tasks are unhealthy" in raised["message"]
    assert raised["line"] == (
        "training across 2 hosts: host 1 (10.0.0.3:2222) stopped answering (no heartbeat); steps "
        "cannot go on without it, nothing was written: start train again on every host"
    )


def tables_of(*fingerprints: dict[str, str]):
    from mnist_lstm.distributed import _digest

    def table(found):
        return {tuple(_digest(k)): tuple(_digest(v)) for k, v in found.items()}

    return [table(found) for found in fingerprints]


def test_hosts_agree_or_the_first_that_differs_is_named_with_its_keys():
    from mnist_lstm.cluster import disagreement
    from mnist_lstm.distributed import _digest

    cluster = Cluster(hosts=tuple(HOSTS), rank=2, workers=3)
    mine = {"train.learning_rate": "0.01", "train.units": "64", "the processed data": "abc"}
    names = {tuple(_digest(key)): key for key in mine}
    assert disagreement(cluster, names, tables_of(mine, mine, mine)) is None

    other = {**mine, "train.learning_rate": "0.5", "train.units": "128"}
    line = disagreement(cluster, names, tables_of(mine, mine, other))
    assert line == (
        "training across 3 hosts: host 2 (10.0.0.4:2222) differs from the chief "
        "(host 0 (10.0.0.2:2222)) in train.learning_rate, train.units; every host needs the same "
        "commit, params and data (set params in params.yaml and commit, not `-S` on one host): "
        "nothing was trained"
    )
    # A key this host does not have (another version of the code): said so, not hidden.
    extra = {**mine, "src/mnist_lstm/new.py": "def"}
    assert "in a key only one of them has;" in disagreement(
        cluster, names, tables_of(mine, extra, mine)
    )


def test_hosts_that_never_came_are_named_and_the_run_cache_is_suspected_for_the_chief():
    from mnist_lstm.cluster import absent, never_came

    worker = Cluster(hosts=("127.0.0.1:1", "127.0.0.1:2"), rank=1, workers=2)
    assert absent(worker) == [0]  # nothing listens on port 1
    line = never_came(worker, 15, [0])
    assert line.startswith(
        "training across 2 hosts: host 0 (127.0.0.1:1) never came within 15 s "
        "(MNIST_LSTM_CLUSTER_TIMEOUT); nothing was trained or written"
    )
    assert "restored train from DVC's run-cache" in line
    chief = Cluster(hosts=("127.0.0.1:1", "127.0.0.1:2"), rank=0, workers=2)
    assert "host 1 (127.0.0.1:2) never came" in never_came(chief, 15, [1])
    assert "run-cache" not in never_came(chief, 15, [1])


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "inf"])
def test_a_bad_cluster_timeout_is_one_line(raw):
    from mnist_lstm.cluster import cluster_timeout

    assert cluster_timeout({}) == 300
    assert cluster_timeout({"MNIST_LSTM_CLUSTER_TIMEOUT": "20"}) == 20
    with pytest.raises(UserError, match="MNIST_LSTM_CLUSTER_TIMEOUT must be a number of seconds"):
        cluster_timeout({"MNIST_LSTM_CLUSTER_TIMEOUT": raw})


def test_the_fingerprint_holds_every_train_param_the_data_and_trains_code(tmp_path):
    from conftest import REPO, default_params
    from mnist_lstm.distributed import fingerprint
    from mnist_lstm.params import TrainParams

    params = TrainParams.model_validate(default_params()["train"])
    data = tmp_path / "mnist.npz"
    data.write_bytes(b"data")
    found = fingerprint(params, data, REPO / "dvc.yaml")
    assert found["train.learning_rate"] == "0.01" and found["train.hosts"] == "1"
    assert found["the processed data"] == "8d777f385d3dfec8815d20f7496026dc"
    assert {"src/mnist_lstm/train.py", "src/mnist_lstm/model.py"} <= set(found)


def test_more_hosts_in_params_than_tf_config_names_is_one_line(monkeypatch):
    from conftest import default_params
    from mnist_lstm import devices
    from mnist_lstm.params import TrainParams

    monkeypatch.delenv("TF_CONFIG", raising=False)
    params = TrainParams.model_validate({**default_params()["train"], "hosts": 2})
    with pytest.raises(UserError, match="train.hosts is 2 but TF_CONFIG names no cluster"):
        devices.place(params)


WAITS = """
import sys, time
from mnist_lstm.cluster import cluster_from, formation_bound
import os
with formation_bound(cluster_from(os.environ), float(sys.argv[1])):
    time.sleep(float(sys.argv[2]))  # TensorFlow forming the cluster, holding the GIL
print("formed", flush=True)
"""


@pytest.mark.parametrize(("bound", "forming", "formed"), [(2, 60, False), (30, 0.5, True)])
def test_forming_the_cluster_is_bounded_by_a_watchdog_process(bound, forming, formed):
    """The watchdog ends a process whose cluster never forms, naming the hosts that never came
    (nothing listens on ports 1 and 2 of 127.0.0.1), and leaves one whose cluster formed alone."""
    import subprocess
    import sys
    import time

    env = {**os.environ, **tf_config({"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "worker", 0)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", WAITS, str(bound), str(forming)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    if formed:
        assert done.returncode == 0 and done.stdout == "formed\n" and done.stderr == ""
    else:
        assert done.returncode != 0 and took < 30, (done.returncode, took)
        assert done.stderr.splitlines() == [
            "error: training across 2 hosts: host 1 (127.0.0.1:2) never came within 2 s "
            "(MNIST_LSTM_CLUSTER_TIMEOUT); nothing was trained or written: start train on every "
            "host with the same TF_CONFIG"
        ]
