"""`make server` / `make server-stop`: a shared MLflow tracking server for a team.

A real PostgreSQL cluster (Debian's `postgresql` package) is created under a project-local folder
(default `.server/`, git-ignored) and started on 127.0.0.1 only; an `mlflow server` runs on top of
it (on 127.0.0.1, or `--host ADDRESS` for a team's other machines, docs/team.md) with proxied
artifact storage (`--artifacts-destination`: a local folder, or any URL MLflow
supports, such as `s3://bucket/prefix`). Prints the tracking URI; point the pipeline at it with
`MLFLOW_TRACKING_URI=<uri> make run`.

    python -m mnist_lstm.server start [--state DIR] [--host 127.0.0.1] [--port 5001]
                                      [--pg-port 5433] [--artifacts-destination URL]
    python -m mnist_lstm.server stop  [--state DIR]

PostgreSQL refuses to run as root: as root, the cluster is owned by and run as the `postgres` user.
The database password is generated once, kept in `<state>/pgpass` (mode 0600) and handed to MLflow
through the environment, never on a command line.
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mnist_lstm.errors import UserError, exits_cleanly, one_line

DB_USER = "mlflow"
DB_NAME = "mlflow"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian keeps them versioned, off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3])
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise UserError(
        "PostgreSQL is not installed: no initdb under /usr/lib/postgresql/*/bin or on PATH "
        "(Debian/Ubuntu: apt-get install postgresql)"
    )


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL will not run as root: drop to the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return cmd
    # runuser lives in sbin, which a minimal PATH (cron, CI, `env -i`) leaves out.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    runuser = shutil.which("runuser", path=search)
    if runuser is None:
        raise UserError(
            "as root, PostgreSQL must run as `postgres`, which needs runuser (util-linux)"
        )
    return [runuser, "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str, **kwargs) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        detail = one_line(
            result.stderr.strip() or result.stdout, last=True, default=f"exit {result.returncode}"
        )
        raise UserError(f"{what} failed: {detail}")


def _password(state: Path) -> str:
    path = state / "pgpass"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def start_postgres(state: Path, port: int) -> str:
    """Create (first time) and start the cluster; the SQLAlchemy URI of its `mlflow` database."""
    bin_dir = postgres_bin()
    data = state / "pg"
    password = _password(state)
    if os.geteuid() == 0:
        # The postgres user must reach the cluster folder through every parent folder.
        state.chmod(0o755)
        reachable = subprocess.run(_as_postgres(["test", "-x", str(state)]), capture_output=True)
        if reachable.returncode != 0:
            raise UserError(
                f"{state}: PostgreSQL runs as the `postgres` user (it refuses root), which cannot "
                "reach this folder; put the state under folders others may enter (mode 755): "
                "`make server STATE=<dir>` (--state <dir>)"
            )
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        pwfile = state / "pgpass.init"
        pwfile.write_text(password)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        try:
            _run(
                _as_postgres(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        DB_USER,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=UTF8",
                    ]
                ),
                f"initdb {data}",
            )
        finally:
            pwfile.unlink()
    log = state / "postgres.log"
    if os.geteuid() == 0 and not log.exists():
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    # Loopback TCP only, and the socket in our own folder (Debian's /var/run/postgresql may be
    # missing or owned by a system cluster).
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}"
    status = subprocess.run(
        _as_postgres([str(bin_dir / "pg_ctl"), "status", "-D", str(data)]), capture_output=True
    )
    if status.returncode != 0:
        _run(
            _as_postgres(
                [
                    str(bin_dir / "pg_ctl"),
                    "start",
                    "-w",
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                ]
            ),
            f"PostgreSQL start on 127.0.0.1:{port} (see {log})",
        )
    env = {**os.environ, "PGPASSWORD": password}
    exists = subprocess.run(
        [
            str(bin_dir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            DB_USER,
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if exists.returncode != 0:
        raise UserError(f"PostgreSQL on 127.0.0.1:{port} does not answer: {exists.stderr.strip()}")
    if exists.stdout.strip() != "1":
        _run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
            "createdb mlflow",
            env=env,
        )
    # The driver named: SQLAlchemy's default for postgresql:// is psycopg 3, which is not installed.
    return f"postgresql+psycopg2://{DB_USER}:{password}@127.0.0.1:{port}/{DB_NAME}"


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow(
    state: Path, backend: str, host: str, port: int, artifacts: str, timeout: float
) -> str:
    uri = f"http://{host}:{port}"
    if _healthy(uri):
        raise UserError(f"something already answers on {uri}: stop it or pick another --port")
    log = state / "mlflow.log"
    # The server keeps its own copy of the log descriptor; ours closes when it has started.
    with log.open("a") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                "2",
                "--serve-artifacts",
                "--artifacts-destination",
                artifacts,
            ],
            env={**os.environ, "MLFLOW_BACKEND_STORE_URI": backend},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (state / "mlflow.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"mlflow server exited ({process.returncode}); see {log}")
        if _healthy(uri):
            (state / "uri").write_text(uri + "\n")
            return uri
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise UserError(f"mlflow server did not answer on {uri} within {timeout:.0f}s; see {log}")


def stop(state: Path) -> list[str]:
    """Stop the MLflow server and the cluster; what was stopped."""
    stopped = []
    pid_file = state / "mlflow.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                os.killpg(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file.unlink()
        (state / "uri").unlink(missing_ok=True)
        stopped.append("mlflow server")
    data = state / "pg"
    if (data / "postmaster.pid").exists():
        _run(
            _as_postgres(
                [str(postgres_bin() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)]
            ),
            "PostgreSQL stop",
        )
        stopped.append("PostgreSQL")
    return stopped


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--state", type=Path, default=Path(".server"))
    # The database stays on loopback whatever this says: only the MLflow server talks to it.
    parser.add_argument("--host", default="127.0.0.1", help="address the MLflow server binds")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--pg-port", type=int, default=5433)
    parser.add_argument("--artifacts-destination", help="default: <state>/artifacts")
    parser.add_argument("--timeout", type=float, default=90)
    args = parser.parse_args(argv)
    state = args.state.resolve()

    if args.action == "stop":
        stopped = stop(state) if state.exists() else []
        print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running under {state}")
        return 0
    state.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts_destination or str(state / "artifacts")
    backend = start_postgres(state, args.pg_port)
    uri = start_mlflow(state, backend, args.host, args.port, artifacts, args.timeout)
    print(f"PostgreSQL on 127.0.0.1:{args.pg_port}, artifacts -> {artifacts}")
    print(f"MLflow tracking server: {uri}")
    print(f"  MLFLOW_TRACKING_URI={uri} make run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
