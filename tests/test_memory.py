"""The train stage's memory: how far its peak goes above what TensorFlow alone takes.

`make bench` measures the full data (docs/performance.md); this guards the stage's own share on
tiny data, each in a fresh process as DVC runs the stage: a change that makes every training
process carry more (an import, a store, a copy of the model) shows up as a larger gap. What grows
with the data (images, batch tensors) barely shows on tiny data: `make bench` watches that.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import make_tiny_raw
from mnist_lstm import contracts
from mnist_lstm.normalize import split

# What the train stage may allocate above a plain `import tensorflow` (private memory, MiB):
# MLflow and its sqlite store, the images, the model's graph, fit's tensors, logging the model,
# less what the package's runtime saves at import (Keras without scikit-learn and matplotlib).
# Measured 116 MiB on Linux x86-64 (docs/performance.md#memory has the full-data breakdown); with
# Keras importing scikit-learn and matplotlib again it was 179 MiB.
MARGIN_MIB = 140


def peak_mib(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(peak resident, peak private MiB) of one process. Resident is the kernel's own peak
    (wait4); it also counts the pages of TensorFlow's shared libraries the process maps, which
    vary with the page cache's state by up to ~100 MiB. Private (anonymous) memory -- what the
    process allocates -- does not: sampled from /proc every 10 ms."""
    process = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    private = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    private = max(private, int(line.split()[1]) / 1024)
        time.sleep(0.01)
    reader.join()
    process.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0, "".join(output)[-3000:]
    return usage.ru_maxrss / 1024, private


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_a_train_stage_peaks_within_its_margin_above_importing_tensorflow(tmp_path, write_params):
    # Enough validation images for whole validation batches, few enough to train in seconds.
    raw = make_tiny_raw(n_train=3000, n_test=2010)
    data = tmp_path / "processed.npz"
    contracts.write_npz(data, split(raw, 10))
    params = write_params({"train.epochs": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tensorflow, tensorflow_private = peak_mib(
        [sys.executable, "-c", "import tensorflow as tf\ntf.zeros((2, 2)) + 1\n"],
        env,
        tmp_path,
    )
    train, train_private = peak_mib(
        [sys.executable, "-m", "mnist_lstm.train", "--params", str(params), "--data", str(data)]
        + ["--model", str(tmp_path / "m.keras"), "--history", str(tmp_path / "h.csv")],
        env,
        tmp_path,
    )
    print(
        f"import tensorflow {tensorflow:.0f} MiB ({tensorflow_private:.0f} private), "
        f"train stage {train:.0f} MiB ({train_private:.0f} private)"
    )
    assert (tmp_path / "m.keras").is_file()
    assert tensorflow_private > 100, "no private memory sampled: /proc/<pid>/status unreadable?"
    above = train_private - tensorflow_private
    assert above <= MARGIN_MIB, (
        f"the train stage's private memory peaked at {train_private:.0f} MiB, {above:.0f} MiB "
        f"above `import tensorflow`'s ({tensorflow_private:.0f} MiB); the budget is {MARGIN_MIB}"
    )
