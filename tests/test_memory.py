"""The train stage's memory: how far its peak goes above what TensorFlow alone takes.

`make bench` measures the full data (docs/performance.md); this guards the same budget on tiny
data, in a fresh process each, as DVC runs the stage: a change that makes training keep more
(a store, an allocator, a bigger validation batch, an import) shows up as a larger gap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_raw
from mnist_lstm import contracts
from mnist_lstm.normalize import split

# What the train stage may take above `import tensorflow` (MiB): MLflow and its sqlite store
# (~110), the images and the model's graph, the tensors of fit, logging the model. Measured
# ~265 MiB on Linux x86-64 with the full validation batch; docs/performance.md has the breakdown.
MARGIN_MIB = 300


def peak_mib(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """The peak resident memory of one process (its own, from the kernel's accounting)."""
    process = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # wait4 reports the child's own maximum RSS (KiB on Linux), not that of all children so far.
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read()
    process.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    return usage.ru_maxrss / 1024


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
def test_a_train_stage_peaks_within_its_margin_above_importing_tensorflow(tmp_path, write_params):
    # Enough validation images for whole validation batches, few enough to train in seconds.
    raw = make_tiny_raw(n_train=3000, n_test=2010)
    data = tmp_path / "processed.npz"
    contracts.write_npz(data, split(raw, 10))
    params = write_params({"train.epochs": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tensorflow = peak_mib(
        [sys.executable, "-c", "from mnist_lstm.runtime import tf\ntf.zeros((2, 2)) + 1\n"],
        env,
        tmp_path,
    )
    train = peak_mib(
        [sys.executable, "-m", "mnist_lstm.train", "--params", str(params), "--data", str(data)]
        + ["--model", str(tmp_path / "m.keras"), "--history", str(tmp_path / "h.csv")],
        env,
        tmp_path,
    )
    print(f"import tensorflow {tensorflow:.0f} MiB, train stage {train:.0f} MiB")
    assert (tmp_path / "m.keras").is_file()
    assert train - tensorflow <= MARGIN_MIB, (
        f"the train stage peaked at {train:.0f} MiB, {train - tensorflow:.0f} MiB above "
        f"`import tensorflow` ({tensorflow:.0f} MiB); the budget is {MARGIN_MIB} MiB"
    )
