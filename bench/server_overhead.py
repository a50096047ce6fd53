"""`make bench-server`: what a login and HTTPS cost a training run, side by side.

Two tracking servers from `python -m mnist_lstm.server` on loopback, each on its own PostgreSQL:
one as one person runs it (no login, plain HTTP), one as a team gets it off loopback (MLflow's
basic-auth app, HTTPS from the server's CA, a trainer from a team file). Rounds interleave
`dvc repro -f -s train` against the two (in a clone of this repo sharing its DVC cache, on the
full data) so the machine's drift hits both alike. Prints the stage's wall seconds per round and
the ratio of medians; writes bench/server_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # `kill` (SIGTERM) unwinds like Ctrl-C: the servers are stopped and the folder removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    base["PATH"] = f"{PYTHON.parent}{os.pathsep}{base['PATH']}"
    work = Path(tempfile.mkdtemp(prefix="mnist-lstm-bench-server-"))
    work.chmod(0o755)  # as root, PostgreSQL runs as `postgres`, who must enter it
    servers: dict[str, dict[str, str]] = {}
    try:
        clone = work / "clone"
        run(["git", "clone", "-q", str(REPO), str(clone)], work, base)
        run(["dvc", "cache", "dir", "--local", str(REPO / ".dvc" / "cache")], clone, base)
        run(["dvc", "checkout", "fetch", "normalize"], clone, base)
        (work / "team.yaml").write_text("users:\n  bench-trainer: trainer\n")
        for name, flags in (("plain", []), ("auth+tls", ["--auth", "--tls"])):
            state = work / name
            cmd = [str(PYTHON), "-m", "mnist_lstm.server", "start", "--state", str(state)]
            cmd += ["--port", str(free_port()), "--pg-port", str(free_port()), *flags]
            run([*cmd, "--team", str(work / "team.yaml")], work, base)
            env = dict(base, MLFLOW_TRACKING_URI=(state / "uri").read_text().strip())
            if flags:
                password = (state / "secrets" / "users" / "bench-trainer").read_text().strip()
                env.update(
                    MLFLOW_TRACKING_USERNAME="bench-trainer",
                    MLFLOW_TRACKING_PASSWORD=password,
                    MLFLOW_TRACKING_SERVER_CERT_PATH=str(state / "tls" / "ca.pem"),
                )
            servers[name] = env
        seconds: dict[str, list[float]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                started = time.perf_counter()
                run(["dvc", "repro", "-f", "-s", "train"], clone, servers[name])
                seconds[name].append(time.perf_counter() - started)
                print(f"round {round_ + 1}: {name:9s} {seconds[name][-1]:6.1f} s", flush=True)
    finally:
        for name in servers:
            stop = [str(PYTHON), "-m", "mnist_lstm.server", "stop", "--state", str(work / name)]
            subprocess.run(stop, cwd=work, env=base, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["auth+tls"] / medians["plain"]
    print(
        f"dvc repro -f -s train, median of {args.rounds}: plain {medians['plain']:.1f} s, "
        f"auth+TLS {medians['auth+tls']:.1f} s; ratio {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)"
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "seconds": seconds,
        "medians": medians,
        "ratio": ratio,
    }
    (REPO / "bench" / "server_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
