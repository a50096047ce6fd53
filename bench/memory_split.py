"""What a process's peak resident memory is made of: its private (anonymous) pages, and the
pages of files it maps -- mostly TensorFlow's shared libraries, which the kernel maps from the
page cache and which every process that loads TensorFlow shares.

`python bench/memory_split.py -- CMD ...` runs CMD and samples /proc/<pid>/status every 20 ms.
It prints one JSON line: the kernel's own peak (VmHWM, what GNU time and `make bench` report as
peak memory) and, per phase of the command, the sample where resident memory was highest, with
its anonymous and file-backed parts (MiB). A phase starts at each line the command prints that
marks one (the train stage's `train:`, `Model:`, `Epoch N/M` lines; before the first, `start`),
so for the train stage: start-up (imports, loading the images, devices and kernel), building the
model, opening the MLflow run (with the model summary's lines), each epoch (its training and its
validation), and saving and logging the model after the last. The sampled maxima can miss a peak
shorter than 20 ms; VmHWM cannot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
PHASE = re.compile(r"^(train: \S+ \S+|Model:|Epoch \d+/\d+)")


def status(pid: int) -> dict[str, float] | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            lines = handle.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values if len(values) == len(FIELDS) else None


def main() -> int:
    if "--" not in sys.argv:
        raise SystemExit("usage: python bench/memory_split.py -- CMD ...")
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    phase = ["start"]

    def follow() -> None:
        for line in process.stdout:
            marker = PHASE.match(line)
            if marker:
                phase[0] = marker.group(1)
            elif line.startswith("938/938") or "/step" in line:
                phase[0] = "after " + phase[0].removeprefix("after ")

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    phases: dict[str, dict[str, float]] = {}
    last: dict[str, float] = {}
    while process.poll() is None:
        sample = status(process.pid)
        if sample:
            last = sample
            name = phase[0]
            if sample["VmRSS"] >= phases.get(name, {}).get("VmRSS", 0.0):
                phases[name] = {**sample, "at_s": time.perf_counter() - started}
        time.sleep(0.02)
    reader.join()
    if process.returncode != 0:
        raise SystemExit(f"memory_split: {' '.join(cmd)} exited with {process.returncode}")
    rows = [
        {"phase": name, **{k: round(v, 1) for k, v in values.items() if k != "VmHWM"}}
        for name, values in phases.items()
    ]
    print(json.dumps({"peak_mib (VmHWM)": round(last.get("VmHWM", 0.0), 1), "phases": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
