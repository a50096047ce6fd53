"""The tracking server's PostgreSQL: a cluster of its own under `<state>/pg`, on 127.0.0.1 only.

Least privilege: the cluster's superuser is the operating-system account that runs it (`postgres`
when we are root: PostgreSQL refuses root), reachable only through the Unix socket inside the
cluster's own folder by peer authentication — no superuser password exists. MLflow logs in over
loopback TCP as the role `mlflow`, which owns its two databases (`mlflow`: runs and the registry;
`mlflow_auth`: the basic-auth app's users and permissions) and nothing else: no superuser, no
CREATEDB, no CREATEROLE. Its password is generated once into `<state>/secrets/pg-password` (0600)
and handed to MLflow through the environment and the auth app's 0600 config, never on a command
line.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

from mnist_lstm.errors import UserError, one_line
from mnist_lstm.server import credentials

ROLE = "mlflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
DATABASES = (TRACKING_DB, AUTH_DB)


class Databases(NamedTuple):
    """SQLAlchemy URIs (with the role's password: keep them out of logs and command lines)."""

    tracking: str
    auth: str


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


def superuser() -> str:
    """The account that owns and runs the cluster, and its only superuser."""
    return "postgres" if os.geteuid() == 0 else getpass.getuser()


def as_postgres(cmd: list[str]) -> list[str]:
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


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    # cwd "/": as root the tools run as `postgres`, who may not enter the caller's folder.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd="/", **kwargs)
    if result.returncode != 0:
        detail = one_line(
            result.stderr.strip() or result.stdout, last=True, default=f"exit {result.returncode}"
        )
        raise UserError(f"{what} failed: {detail}")
    return result


def data_dir(state: Path) -> Path:
    return state / "pg"


def superuser_tool(state: Path, port: int, tool: str, *args: str) -> list[str]:
    """A PostgreSQL client tool connected as the superuser, through the cluster's own socket."""
    socket = str(data_dir(state))
    return as_postgres(
        [str(postgres_bin() / tool), "-h", socket, "-p", str(port), "-U", superuser(), *args]
    )


def psql(state: Path, port: int, sql: str, what: str, database: str = "postgres") -> str:
    """Run SQL as the superuser; the SQL goes through stdin, never onto a command line."""
    cmd = superuser_tool(state, port, "psql", "-d", database, "-v", "ON_ERROR_STOP=1", "-tAq")
    return run(cmd, what, input=sql).stdout


def _check_reachable(state: Path) -> None:
    # The postgres user must reach the cluster folder through every parent folder.
    state.chmod(0o755)
    reachable = subprocess.run(as_postgres(["test", "-x", str(state)]), capture_output=True)
    if reachable.returncode != 0:
        raise UserError(
            f"{state}: PostgreSQL runs as the `postgres` user (it refuses root), which cannot "
            "reach this folder; put the state under folders others may enter (mode 755): "
            "`make server STATE=<dir>` (--state <dir>)"
        )


def _init_cluster(state: Path) -> None:
    data = data_dir(state)
    data.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    initdb = [str(postgres_bin() / "initdb"), "-D", str(data), "-U", superuser()]
    # The socket (in the cluster's 0700 folder) by peer identity; TCP by SCRAM password.
    initdb += ["--auth-local=peer", "--auth-host=scram-sha-256", "--encoding=UTF8"]
    run(as_postgres(initdb), f"initdb {data}")


def _made_by_older_version(data: Path) -> bool:
    """Clusters made before least privilege: `mlflow` was their superuser, with no peer login."""
    hba = data / "pg_hba.conf"
    lines = [x.split() for x in hba.read_text().splitlines() if x.strip() and x[0] != "#"]
    return not any(x[0] == "local" and x[-1] == "peer" for x in lines)


def start(state: Path, port: int) -> Databases:
    """Create (first time) and start the cluster, the `mlflow` role and its databases."""
    data = data_dir(state)
    if os.geteuid() == 0:
        _check_reachable(state)
    if not (data / "PG_VERSION").exists():
        _init_cluster(state)
    elif _made_by_older_version(data):
        raise UserError(
            f"{data}: made by an older `make server`, where MLflow logs in as a PostgreSQL "
            "superuser; keep that server as it is (`git checkout` the older version) or start a "
            "new one with `make server STATE=<new dir>`"
        )
    log = state / "postgres.log"
    if os.geteuid() == 0 and not log.exists():
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    # Loopback TCP only, and the socket in the cluster's own folder (Debian's /var/run/postgresql
    # may be missing or owned by a system cluster).
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}"
    pg_ctl = str(postgres_bin() / "pg_ctl")
    status = subprocess.run(as_postgres([pg_ctl, "status", "-D", str(data)]), capture_output=True)
    if status.returncode != 0:
        run(
            as_postgres([pg_ctl, "start", "-w", "-D", str(data), "-l", str(log), "-o", options]),
            f"PostgreSQL start on 127.0.0.1:{port} (see {log})",
        )
    password = credentials.generated(credentials.folder(state) / "pg-password")
    psql(state, port, _roles_sql(password), "PostgreSQL role and databases")
    # The driver named: SQLAlchemy's default for postgresql:// is psycopg 3, which is not installed.
    base = f"postgresql+psycopg2://{ROLE}:{password}@127.0.0.1:{port}"
    return Databases(f"{base}/{TRACKING_DB}", f"{base}/{AUTH_DB}")


def _roles_sql(password: str) -> str:
    """Idempotent: the role exactly as privileged as it must be, its databases, nobody else in."""
    lines = [
        f"SELECT 'CREATE ROLE {ROLE}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = '{ROLE}')\\gexec",
        f"ALTER ROLE {ROLE} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
        f"NOBYPASSRLS PASSWORD '{password}';",
    ]
    for database in DATABASES:
        lines += [
            f"SELECT 'CREATE DATABASE {database} OWNER {ROLE}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{database}')\\gexec",
            f"REVOKE ALL ON DATABASE {database} FROM PUBLIC;",
        ]
    # Every role may connect to these by default; the `mlflow` role needs neither.
    lines += ["REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;"]
    lines += ["REVOKE CONNECT ON DATABASE template1 FROM PUBLIC;"]
    return "\n".join(lines) + "\n"


def stop(state: Path) -> bool:
    """Stop the cluster if it runs; whether it did."""
    data = data_dir(state)
    if not (data / "postmaster.pid").exists():
        return False
    run(
        as_postgres([str(postgres_bin() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)]),
        "PostgreSQL stop",
    )
    return True
