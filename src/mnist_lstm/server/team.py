"""The team file (`team.yaml`, in the repo): who may use the tracking server, with which role.

    users:
      alice: trainer
      bob: promoter
      carol: reader

`make server` applies it at every start and `make server-team` on a running server; users not in
it are removed. New users' passwords are generated into `<state>/secrets/users/<name>` (0600): hand
each to its owner, who exports it as MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mnist_lstm.errors import UserError
from mnist_lstm.server import credentials

# MLflow's login form asks for 4+ characters; letters, digits, . _ - keep names safe in paths.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{3,63}$")


def read(path: Path) -> dict[str, str]:
    """{user: role} from the team file; a missing file is a team of nobody (the admin only)."""
    from mnist_lstm.tracking.access import ADMIN, ROLES

    if not path.exists():
        return {}
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    users = document.get("users") if isinstance(document, dict) else None
    if not isinstance(users, dict) or set(document) - {"users"}:
        raise UserError(f"{path}: must hold one mapping `users:` of name: role (docs/team.md)")
    for name, role in users.items():
        if not isinstance(name, str) or not _NAME.match(name) or name == ADMIN:
            raise UserError(
                f"{path}: user {name!r}: 4-64 letters, digits, '.', '_' or '-', not {ADMIN!r}"
            )
        if role not in ROLES:
            raise UserError(
                f"{path}: user {name}: role must be one of {', '.join(ROLES)}, got {role!r}"
            )
    return dict(users)


def apply(state: Path, team_file: Path) -> list[str]:
    """Make the running server's users exactly the team file's; one line per change."""
    from mnist_lstm.server import settings
    from mnist_lstm.tracking import access

    members = read(team_file)
    recorded = settings(state)
    if not recorded["auth"]:
        if members:
            raise UserError(
                f"{recorded['uri']} runs without authentication: users mean nothing there; "
                "start it with `make server AUTH=1` (on by default off loopback)"
            )
        return []
    secrets = credentials.folder(state)
    passwords = secrets / "users"
    passwords.mkdir(mode=0o700, exist_ok=True)
    admin_password = (secrets / "admin-password").read_text().strip()
    with access.signed_in(access.ADMIN, admin_password, recorded["trust"]):
        return access.apply_team(recorded["uri"], members, passwords, credentials.generated)
