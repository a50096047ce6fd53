"""`make bench-reproduce`: what `make reproduce` of the tutorial champion costs, side by side.

In a clone of this repo (its committed params: the tutorial's, the full data) with a store and a
DVC cache of its own: `dvc repro -f` trains and evaluates, `make promote` registers the model as the
champion, then rounds interleave
- `dvc repro -f` (the plain retrain, every stage forced),
- `python -m mnist_lstm.reproduce` with the DVC cache emptied first (it retrains), and
- `python -m mnist_lstm.reproduce` with the cache the rebuild left (it restores),
so the machine's drift hits all three alike. Prints each round's wall seconds and the medians'
ratios; writes bench/reproduce.json. Targets (issue 26): restored <= 15 s, retrained <= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
RESTORED = "reproduced bit for bit (restored from the cache)"
RETRAINED = "reproduced bit for bit (retrained in "


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{PYTHON.parent}{os.pathsep}{env['PATH']}"
    work = Path(tempfile.mkdtemp(prefix="mnist-lstm-bench-reproduce-"))
    try:
        clone, cache = work / "clone", work / "cache"
        run(["git", "clone", "-q", str(REPO), str(clone)], work, env)
        run(["dvc", "cache", "dir", "--local", str(cache)], clone, env)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        env["PYTHONPATH"] = str(clone / "src")
        run(["dvc", "repro", "-f"], clone, env)
        run([str(PYTHON), "-m", "mnist_lstm.promote"], clone, env)
        times: dict[str, list[float]] = {"dvc repro -f": [], "retrained": [], "restored": []}
        for round_ in range(1, args.rounds + 1):
            times["dvc repro -f"].append(run(["dvc", "repro", "-f"], clone, env)[0])
            shutil.rmtree(cache)
            seconds, out = run([str(PYTHON), "-m", "mnist_lstm.reproduce"], clone, env)
            assert RETRAINED in out, out
            times["retrained"].append(seconds)
            seconds, out = run([str(PYTHON), "-m", "mnist_lstm.reproduce"], clone, env)
            assert RESTORED in out, out
            times["restored"].append(seconds)
            print(
                f"round {round_}: "
                + ", ".join(f"{name} {values[-1]:.1f} s" for name, values in times.items()),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "seconds": times,
        "median_seconds": medians,
        "retrained_vs_dvc_repro_f": medians["retrained"] / medians["dvc repro -f"],
    }
    (REPO / "bench" / "reproduce.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"reproduce restored from the cache: median {medians['restored']:.1f} s (target <= 15 s); "
        f"retrained: {result['retrained_vs_dvc_repro_f']:.2f}x a plain `dvc repro -f` "
        f"({medians['retrained']:.1f} s vs {medians['dvc repro -f']:.1f} s; target <= 1.1x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
