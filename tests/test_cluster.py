"""TF_CONFIG, TensorFlow's cluster spec: which hosts train together and which one writes."""

from __future__ import annotations

import json

import pytest

from mnist_lstm.distributed import Cluster, cluster_from
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
