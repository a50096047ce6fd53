"""`make server-backup TO=<dir>` / `make server-restore FROM=<dir> [STATE=<new dir>]`.

A backup is one folder (0700): `pg_dump` custom-format dumps of both databases (runs, metrics and
the registry; the auth app's users and permissions), the artifacts folder as a tar file, and the
secrets and CA a restored server needs to stay the same server for the team (the admin's password,
the Flask key, users' generated passwords, the TLS authority: teammates keep their settings).
Restore goes into a fresh state folder only; it never overwrites a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

from mnist_lstm.errors import UserError, one_line
from mnist_lstm.server import credentials, postgres

MANIFEST = "manifest.json"
ARTIFACTS = "artifacts.tar"
# What of the state travels with a backup; pg-password does not (a restore makes its own role).
KEPT = ("secrets/admin-password", "secrets/flask-secret-key", "secrets/users", "tls")


def _dump(state: Path, port: int, database: str, target: Path) -> None:
    # As root pg_dump runs as `postgres`, who may not write here: it writes stdout to our file.
    with target.open("wb") as out:
        tool = postgres.superuser_tool(state, port, "pg_dump", "-Fc", "-d", database)
        result = subprocess.run(tool, stdout=out, stderr=subprocess.PIPE, text=False, cwd="/")
    if result.returncode != 0:
        target.unlink(missing_ok=True)
        raise UserError(f"pg_dump {database} failed: {one_line(result.stderr.decode(), last=True)}")


def _copy_private(source: Path, target: Path) -> None:
    if source.is_dir():
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        for child in sorted(source.iterdir()):
            _copy_private(child, target / child.name)
    elif source.exists():
        credentials.write_private(target, source.read_text())


def backup(state: Path, to: Path) -> list[str]:
    from mnist_lstm.server import settings

    recorded = settings(state)  # the cluster must run: pg_dump reads it live, consistently
    to = to.resolve()
    if to.exists() and any(to.iterdir()):
        raise UserError(f"{to}: not empty; back up into a new folder")
    started = time.monotonic()
    umask = os.umask(0o077)  # everything in a backup is for its owner only
    try:
        return _backup(state, recorded, to, started)
    finally:
        os.umask(umask)


def _backup(state: Path, recorded: dict, to: Path, started: float) -> list[str]:
    to.mkdir(parents=True, exist_ok=True)
    to.chmod(0o700)
    for database in postgres.DATABASES:
        _dump(state, recorded["pg_port"], database, to / f"{database}.dump")
    artifacts = state / "artifacts"
    lines = []
    if artifacts.is_dir():
        with tarfile.open(to / ARTIFACTS, "w") as tar:
            tar.add(artifacts, arcname="artifacts")
    else:
        lines.append("artifacts: not in the state folder (ARTIFACTS=...); back them up there")
    for kept in KEPT:
        _copy_private(state / kept, to / kept)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uri": recorded["uri"],
        "auth": recorded["auth"],
        "databases": list(postgres.DATABASES),
        "artifacts": artifacts.is_dir(),
    }
    (to / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in to.rglob("*") if p.is_file())
    lines.insert(
        0,
        f"backup: {state} -> {to} ({size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s); "
        f"restore with `make server-restore FROM={to} STATE=<new dir>`",
    )
    return lines


def restore(source: Path, state: Path, pg_port: int) -> list[str]:
    source = source.resolve()
    if not (source / MANIFEST).is_file():
        raise UserError(f"{source}: not a backup (no {MANIFEST}); `make server-backup` writes one")
    manifest = json.loads((source / MANIFEST).read_text())
    if (postgres.data_dir(state) / "PG_VERSION").exists():
        raise UserError(
            f"{state}: holds a server already; restore into a new folder (STATE=<new dir>)"
        )
    started = time.monotonic()
    state.mkdir(parents=True, exist_ok=True)
    for kept in KEPT:
        _copy_private(source / kept, state / kept)
    postgres.start(state, pg_port)
    try:
        for database in manifest["databases"]:
            tool = postgres.superuser_tool(
                state, pg_port, "pg_restore", "-d", database, "--no-owner",
                f"--role={postgres.ROLE}", "--exit-on-error",
            )  # fmt: skip
            with (source / f"{database}.dump").open("rb") as dump:
                result = subprocess.run(tool, stdin=dump, capture_output=True, cwd="/")
            if result.returncode != 0:
                detail = one_line(result.stderr.decode(), last=True)
                raise UserError(f"pg_restore {database} failed: {detail}")
    finally:
        postgres.stop(state)
    if manifest["artifacts"]:
        with tarfile.open(source / ARTIFACTS) as tar:
            tar.extractall(state, filter="data")
    return [
        f"restore: {source} -> {state} in {time.monotonic() - started:.1f} s; start it with "
        f"`make server STATE={state}` (same users, passwords and CA as the backed-up server)"
    ]
