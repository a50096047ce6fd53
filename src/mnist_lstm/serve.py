"""Serve a model over REST on loopback: `python -m mnist_lstm.serve [--model URI] [--port N]`
(what `make serve` runs).

Downloads the model (default `models:/mnist-lstm@champion`) into a temporary folder and checks it
there -- a registered version's Keras file must still have the md5 recorded when it was registered,
and its MLmodel must load that file through mlflow.keras alone -- then runs `mlflow models serve
--env-manager local` on that checked copy: what is served is what was checked, whatever the
artifact store holds meanwhile. A model that fails the check is refused in one `error:` line and
nothing listens. Ctrl-C (or SIGTERM) stops the server and removes the copy.

Loopback only: MLflow's scoring server has no authentication.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import psutil

from mnist_lstm import tracking
from mnist_lstm.errors import UserError, exits_cleanly
from mnist_lstm.tracking import registry

DEFAULT_MODEL = f"models:/{registry.REGISTERED_MODEL}@{registry.CHAMPION}"
HOST = "127.0.0.1"
STOP_SECONDS = 30  # how long the server gets to stop on SIGTERM before it is killed
# How uvicorn's failed bind reads (Linux, macOS, Windows), before MLflow's traceback.
IN_USE_SIGNS = ("address already in use", "[errno 98]", "[errno 48]", "[errno 10048]")


def serve_command(folder: Path, port: int) -> list[str]:
    """MLflow's own scoring server on a local model folder, in this environment (no per-model
    virtualenv to build, so it works offline)."""
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder)]
    return cmd + ["--env-manager", "local", "--host", HOST, "--port", str(port)]


def port_in_use(port: int) -> UserError:
    return UserError(
        f"serve: port {port} on {HOST} is in use; pick another with SERVE_PORT=<port> make serve "
        "(--port <port>)"
    )


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        # As uvicorn binds: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise port_in_use(port) from None
            raise UserError(
                f"serve: port {port} on {HOST} cannot be used ({err.strerror}); pick another "
                "with SERVE_PORT=<port> make serve (--port <port>)"
            ) from None


class HeldOutput:
    """The server's output, held until it answers on its port, then passed on as it comes: a
    server that cannot start (the port taken meanwhile: two `make serve` at once) ends in one
    line instead of uvicorn's error and MLflow's traceback."""

    def __init__(self, stream: IO[str]) -> None:
        self._held: list[str] = []
        self._lock = threading.Lock()
        self.released = False
        self._pump = threading.Thread(target=self._forward, args=(stream,), daemon=True)
        self._pump.start()

    def _forward(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                if self.released:
                    print(line, end="", flush=True)
                else:
                    self._held.append(line)

    def release(self) -> None:
        """What was held, printed now; from now on every line as it comes."""
        with self._lock:
            print("".join(self._held), end="", flush=True)
            self._held, self.released = [], True

    def held(self) -> str:
        with self._lock:
            return "".join(self._held)

    def finish(self) -> str:
        """After the server exited: what is still held."""
        self._pump.join(timeout=10)
        with self._lock:
            return "".join(self._held)


# Straight to the port: a proxy in http_proxy would answer for it (or never).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers(port: int) -> bool:
    try:
        with _DIRECT.open(f"http://{HOST}:{port}/ping", timeout=1) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # not up yet, or not an HTTP server
        return False


def says_it_listens(output: str, port: int) -> bool:
    """Whether the server's own output says it bound the port (uvicorn: `Uvicorn running on
    http://127.0.0.1:5002`; gunicorn: `Listening at: …`). /ping alone could be answered by
    another server on that port: a second `make serve` started at the same moment."""
    return any(
        ("running on" in line or "listening at" in line) and f":{port}" in line
        for line in output.lower().splitlines()
    )


def _stop(server: subprocess.Popen) -> None:
    """The server and the workers it started (its own process group) stop, every one of them
    before this returns (the CLI exits before its uvicorn worker); killed if they hang."""
    try:
        processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(True)]
        os.killpg(server.pid, signal.SIGTERM)
    except (psutil.NoSuchProcess, ProcessLookupError):
        server.wait()
        return
    _, alive = psutil.wait_procs(processes, timeout=STOP_SECONDS)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    server.wait()


def _end_group(pgid: int) -> None:
    """Whatever of the server's process group outlived it (nothing, as a rule) is killed.
    (No process groups on Windows: there the server's own exit is all there is.)"""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@exits_cleanly
@tracking.refusals()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--port", type=int, default=5002)
    args = parser.parse_args(argv)

    check_port_free(args.port)
    with tempfile.TemporaryDirectory(prefix="mnist-lstm-serve-") as scratch:
        checked = registry.download_checked(args.model, Path(scratch))
        if checked.version is None:
            print(
                f"serve: {checked.label} is not a registered model version: no recorded md5 to "
                f"check its bytes against (md5 {checked.md5})"
            )
        else:
            print(f"serve: {checked.label}: its bytes have the md5 recorded at registration")
        print(
            f"serve: starting on http://{HOST}:{args.port}/invocations; Ctrl-C stops it", flush=True
        )
        server = output = None
        try:
            # Its own process group: Ctrl-C in a terminal reaches this process only, which stops
            # the server with its workers, then removes the checked copy.
            server = subprocess.Popen(
                serve_command(checked.folder, args.port),
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            output = HeldOutput(server.stdout)
            # Polled, not a blocking wait: exits_cleanly restarts interrupted system calls, and a
            # restarted waitpid would leave Ctrl-C unheard until the server exits by itself.
            answering_since = None
            while (status := server.poll()) is None:
                if not output.released and answers(args.port):
                    answering_since = answering_since or time.monotonic()
                    # Its own line says it bound the port; failing that, a port that answered
                    # for 10 s is its (a server that lost the bind exits within seconds).
                    if says_it_listens(output.held(), args.port) or (
                        time.monotonic() - answering_since > 10
                    ):
                        output.release()
                time.sleep(0.5)
        except KeyboardInterrupt:
            if server is not None:
                _stop(server)
            if output is not None:
                output.finish()  # its last lines before ours
            print("serve: stopped")
            return 0
        finally:
            if server is not None:
                _end_group(server.pid)
    held = output.finish()
    if status != 0 and any(sign in held.lower() for sign in IN_USE_SIGNS):
        raise port_in_use(args.port)
    output.release()
    if status != 0:
        raise UserError(f"mlflow models serve exited with status {status} (its output is above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
