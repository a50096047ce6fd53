"""`make server` / `make server-stop` / `make server-team` / `make server-backup` /
`make server-restore`: the team's MLflow tracking server.

A real PostgreSQL cluster (Debian's `postgresql` package) under a state folder (default
`.server/`, git-ignored), on 127.0.0.1 only (postgres.py), and `mlflow server` on top of it with
proxied artifact storage (`--artifacts-destination`: a local folder, or any URL MLflow supports).

Off loopback (`--host <address>`) the server lets in only the team: MLflow's own basic-auth app
(its users and permissions in the same PostgreSQL; default permission NO_PERMISSIONS; the admin's
password and the Flask secret key generated into `<state>/secrets/`, 0600) over HTTPS (uvicorn's
TLS, with a certificate from the state's own CA, tls.py, or the team's own). On loopback both are
off unless asked (`--auth`, `--tls`): one person's server stays as simple as it was. Plain HTTP
off loopback only with `--plain-http-sends-passwords-in-clear`.

    python -m mnist_lstm.server start [--state DIR] [--host 127.0.0.1] [--port 5001]
        [--pg-port 5433] [--artifacts-destination URL] [--auth] [--tls]
        [--tls-cert PEM --tls-key PEM] [--plain-http-sends-passwords-in-clear] [--team FILE]
    python -m mnist_lstm.server team    [--state DIR] [--team FILE]   # apply team.yaml again
    python -m mnist_lstm.server backup  [--state DIR] --to DIR
    python -m mnist_lstm.server restore --from DIR [--state NEW_DIR]
    python -m mnist_lstm.server stop    [--state DIR]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mnist_lstm.errors import UserError, exits_cleanly
from mnist_lstm.server import credentials, postgres, team, tls

ADMIN = "admin"
AUTH_CACHE_SECONDS = 10
# What `start` records for `team`, `backup` and clients: the URI, whether auth is on, what to trust.
SETTINGS = "server.json"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _health_context(trust: Path | None) -> ssl.SSLContext:
    if trust is None:  # the team's own certificate: its issuer may be in no local store
        return ssl._create_unverified_context()  # noqa: S323 - our own process, just started
    return ssl.create_default_context(cafile=str(trust))


def _healthy(uri: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def _auth_config(state: Path, database: str) -> Path:
    """The basic-auth app's config: NO_PERMISSIONS for anyone not granted, users in PostgreSQL."""
    path = credentials.folder(state) / "basic_auth.ini"
    credentials.write_private(
        path,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # Checking a password is a deliberately slow hash (PBKDF2): ~0.4 s a request here, on
        # every request -- a run's per-epoch writes took 40% longer. Remembered for 10 s per
        # worker instead (MLflow's own cache): a password change or a removed user reaches the
        # other worker within those 10 s.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n",
    )
    return path


def start_mlflow(
    state: Path,
    databases: postgres.Databases,
    host: str,
    port: int,
    artifacts: str,
    timeout: float,
    auth: bool = False,
    certificate: tls.Certificate | None = None,
) -> str:
    scheme = "https" if certificate else "http"
    uri = f"{scheme}://{host}:{port}"
    context = _health_context(certificate.trust) if certificate else None
    if _healthy(uri, context) or _healthy(f"http://{host}:{port}"):
        raise UserError(f"something already answers on {uri}: stop it or pick another --port")
    # No client credentials of whoever starts it leak into the server's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_BACKEND_STORE_URI"] = databases.tracking
    # MLflow 3.17 starts a job runner and seven queue consumers (~240 MB each) for its GenAI
    # jobs (prompt optimization, scorers); nothing here uses them.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port)]
    cmd += ["--workers", "2", "--serve-artifacts", "--artifacts-destination", artifacts]
    if auth:
        secrets = credentials.folder(state)
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_config(state, databases.auth))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = credentials.generated(
            secrets / "flask-secret-key", 32
        )
        # Used once, when the auth tables have no admin yet; ignored afterwards.
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = credentials.generated(secrets / "admin-password")
    if certificate:
        options = ["--ssl-certfile", str(certificate.cert), "--ssl-keyfile", str(certificate.key)]
        cmd += ["--uvicorn-opts", shlex.join(options)]
    log = state / "mlflow.log"
    # The server keeps its own copy of the log descriptor; ours closes when it has started.
    with log.open("a") as log_file:
        process = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    (state / "mlflow.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"mlflow server exited ({process.returncode}); see {log}")
        if _healthy(uri, context):
            return uri
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise UserError(f"mlflow server did not answer on {uri} within {timeout:.0f}s; see {log}")


def _stop_mlflow(state: Path) -> bool:
    pid_file = state / "mlflow.pid"
    if not pid_file.exists():
        return False
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
    return True


def stop(state: Path) -> list[str]:
    """Stop the MLflow server and the cluster; what was stopped."""
    stopped = ["mlflow server"] if _stop_mlflow(state) else []
    if postgres.stop(state):
        stopped.append("PostgreSQL")
    return stopped


def settings(state: Path) -> dict:
    path = state / SETTINGS
    if not path.exists() or not (state / "uri").exists():
        raise UserError(f"no server runs from {state}: start it with `make server`")
    return json.loads(path.read_text())


def _certificate(args: argparse.Namespace, host: str) -> tls.Certificate | None:
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UserError("TLS_CERT= and TLS_KEY= go together: the certificate and its key")
        return tls.own_certificate(args.tls_cert, args.tls_key)
    if args.plain_http_sends_passwords_in_clear or (is_loopback(host) and not args.tls):
        return None
    return tls.server_certificate(args.state, host)


def _start(args: argparse.Namespace) -> list[str]:
    state, host = args.state, args.host
    exposed = not is_loopback(host)
    auth = args.auth or exposed
    if auth:
        team.read(args.team)  # a mistake in the team file stops it before anything starts
    certificate = _certificate(args, host)
    state.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts_destination or str(state / "artifacts")
    databases = postgres.start(state, args.pg_port)
    uri = start_mlflow(
        state, databases, host, args.port, artifacts, args.timeout, auth, certificate
    )
    trust = certificate.trust if certificate else None
    recorded = {"uri": uri, "auth": auth, "trust": str(trust) if trust else None}
    recorded |= {"own_certificate": bool(certificate and not trust), "pg_port": args.pg_port}
    (state / SETTINGS).write_text(json.dumps(recorded, indent=1) + "\n")
    (state / "uri").write_text(uri + "\n")
    lines = [f"PostgreSQL on 127.0.0.1:{args.pg_port}, artifacts -> {artifacts}"]
    lines.append(f"MLflow tracking server: {uri}")
    if auth:
        lines += team.apply(state, args.team)
        lines.append(
            f"  basic auth: admin password in {state / 'secrets' / 'admin-password'}; "
            "teammates sign in with MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
        )
    else:
        lines.append("  no authentication: anyone who reaches this address can read and write")
    if trust:
        lines.append(f"  MLFLOW_TRACKING_SERVER_CERT_PATH={trust}")
    elif certificate is None and exposed:
        lines.append("  plain HTTP off loopback: passwords and runs travel in clear")
    lines.append(f"  MLFLOW_TRACKING_URI={uri} make run")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "team", "backup", "restore"])
    parser.add_argument("--state", type=Path, default=Path(".server"))
    # The database stays on loopback whatever this says: only the MLflow server talks to it.
    parser.add_argument("--host", default="127.0.0.1", help="address the MLflow server binds")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--pg-port", type=int, default=5433)
    parser.add_argument("--artifacts-destination", help="default: <state>/artifacts")
    parser.add_argument("--timeout", type=float, default=90)
    parser.add_argument("--auth", action="store_true", help="basic auth on loopback too")
    parser.add_argument("--tls", action="store_true", help="HTTPS on loopback too")
    parser.add_argument("--tls-cert", type=Path, help="your own certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    parser.add_argument("--plain-http-sends-passwords-in-clear", action="store_true")
    parser.add_argument("--team", type=Path, default=Path("team.yaml"))
    parser.add_argument("--to", type=Path, help="backup: the folder to write")
    parser.add_argument("--from", dest="source", type=Path, help="restore: a backup folder")
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    from mnist_lstm.server import backup

    args = _parser().parse_args(argv)
    args.state = args.state.resolve()
    if args.action == "stop":
        stopped = stop(args.state) if args.state.exists() else []
        print(
            f"stopped: {', '.join(stopped)}" if stopped else f"nothing running under {args.state}"
        )
        return 0
    if args.action == "start":
        lines = _start(args)
    elif args.action == "team":
        lines = team.apply(args.state, args.team)
        lines = lines or [f"team: the server's users already match {args.team}"]
    elif args.action == "backup":
        if args.to is None:
            raise UserError("backup: say where to write it (`make server-backup TO=<dir>`)")
        lines = backup.backup(args.state, args.to)
    else:
        if args.source is None:
            raise UserError("restore: say which backup (`make server-restore FROM=<dir>`)")
        lines = backup.restore(args.source, args.state, args.pg_port)
    print("\n".join(lines))
    return 0
