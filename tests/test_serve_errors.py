"""`make serve` (python -m mnist_lstm.serve) on a port that is taken: one `error:` line, a non-zero
exit and nothing left running -- whether the port is taken before it starts or while it downloads
and checks the model (two `make serve` at once). Real processes, a real socket holding the port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import free_port

# Each case starts the CLI (TensorFlow's import), the second also MLflow's scoring server.
pytestmark = pytest.mark.slow


def expected_line(port: int) -> str:
    return (
        f"error: serve: port {port} on 127.0.0.1 is in use; pick another with SERVE_PORT=<port> "
        "make serve (--port <port>)"
    )


def serve(model: str, port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_lstm.serve", "--model", model, "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def left_running(port: int) -> list[psutil.Process]:
    """Processes (mlflow, uvicorn) started for this port that still run."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if str(port) in cmdline or any(f"--port {port}" in part for part in cmdline):
            found.append(process)
    return found


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_a_port_taken_before_serve_starts_is_one_line(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = serve("models:/mnist-lstm@champion", port, env, tmp_path)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert error_lines(err) == [expected_line(port)]
    assert "Traceback" not in out + err and "serve: starting" not in out
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was opened


def test_a_port_taken_while_serve_starts_is_one_line_and_leaves_nothing_running(tmp_path):
    from test_champion import log_model_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        _, model_id, _ = log_model_run(tmp_path, seed=0)
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
    port = free_port()
    proc = serve(f"models:/{model_id}", port, env, tmp_path)
    holder = socket.socket()
    try:
        seen = []
        for line in proc.stdout:  # the port was free when it checked; another server takes it
            seen.append(line)
            if line.startswith("serve: starting"):
                holder.bind(("127.0.0.1", port))
                holder.listen()
                break
        out, err = proc.communicate(timeout=300)
        out = "".join(seen) + out
    finally:
        holder.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out + err
    assert error_lines(err) == [expected_line(port)], out + err
    assert "Traceback" not in out + err and "address already in use" not in (out + err).lower()
    assert not left_running(port)
