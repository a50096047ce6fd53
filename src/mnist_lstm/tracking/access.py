"""Who may do what on the team's tracking server, through MLflow's own basic-auth app.

The server's admin (`make server`) creates the experiment and the registered model, so no
teammate owns them by accident, and applies the team file (`team.yaml`): each user gets one role,

    reader    READ on the experiment, READ on the registered model   (sees runs and models)
    trainer   EDIT on the experiment, READ on the registered model   (logs runs: `dvc exp run`)
    promoter  EDIT on the experiment, EDIT on the registered model   (`make promote`: @champion;
              registering tags the run's logged model, so a promoter may write runs too)

and everyone else NO_PERMISSIONS (the server's default). Applying is idempotent; a user no longer
in the file is deleted. New users' passwords are generated into a 0600 file each, never printed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mnist_lstm.tracking.store import (
    CERT_ENV,
    PASSWORD_ENV,
    USERNAME_ENV,
    TrackingError,
    connect,
    reason,
)

# isort: split
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.server.auth.permissions import RESOURCE_TYPE_EXPERIMENT, RESOURCE_TYPE_REGISTERED_MODEL
from mlflow.server.auth.routes import LIST_USERS
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from mnist_lstm.errors import one_line
from mnist_lstm.tracking.registry import REGISTERED_MODEL

ADMIN = "admin"
# (experiment, registered model) per role.
ROLES = {
    "reader": ("READ", "READ"),
    "trainer": ("EDIT", "READ"),
    "promoter": ("EDIT", "EDIT"),
}


@contextlib.contextmanager
def signed_in(username: str, password: str, trust: str | None = None) -> Iterator[None]:
    """MLflow's client reads its credentials (and the CA to trust) from the environment on every
    request."""
    given = {USERNAME_ENV: username, PASSWORD_ENV: password, CERT_ENV: trust}
    given = {key: value for key, value in given.items() if value}
    saved = {key: os.environ.get(key) for key in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create_resources(uri: str) -> str:
    """As the admin: the experiment and the registered model the team uses; the experiment id."""
    experiment_id = connect(uri=uri)
    client = mlflow.MlflowClient(uri)
    try:
        client.get_registered_model(REGISTERED_MODEL)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"{uri}: cannot read the registry ({one_line(err)})") from None
        client.create_registered_model(REGISTERED_MODEL)
    return experiment_id


def _users(uri: str) -> set[str]:
    # MLflow's AuthServiceClient has no list call (3.17); its REST route, as that client calls it.
    response = http_request(get_default_host_creds(uri), LIST_USERS, "GET")
    response = verify_rest_response(response, LIST_USERS)
    return {user["username"] for user in response.json().get("users", [])}


def _grant(client, user: str, kind: str, resource: str, permission: str) -> bool:
    """Make `user`'s grant on the resource exactly `permission`; whether anything changed."""
    current = client.get_user_permission(user, kind, resource).permission
    if current == permission:
        return False
    with contextlib.suppress(MlflowException):  # no grant of their own yet (the default applies)
        client.revoke_user_permission(user, kind, resource)
    client.grant_user_permission(user, kind, resource, permission)
    return True


def apply_team(uri: str, team: dict[str, str], passwords: Path, new_password) -> list[str]:
    """Make the server's users exactly `team` ({name: role}); one line per change.

    `new_password(path)` generates a new user's password into `path` and returns it.
    """
    client = get_app_client("basic-auth", tracking_uri=uri)
    experiment_id = create_resources(uri)
    said = []
    try:
        existing = _users(uri)
        for user, role in sorted(team.items()):
            if user not in existing:
                client.create_user(user, new_password(passwords / user))
                said.append(f"user {user} ({role}) created; password in {passwords / user}")
            on_experiment, on_model = ROLES[role]
            changed = _grant(client, user, RESOURCE_TYPE_EXPERIMENT, experiment_id, on_experiment)
            changed |= _grant(
                client, user, RESOURCE_TYPE_REGISTERED_MODEL, REGISTERED_MODEL, on_model
            )
            if changed and user in existing:
                said.append(f"user {user} is now a {role}")
        for user in sorted(existing - set(team) - {ADMIN}):
            client.delete_user(user)
            (passwords / user).unlink(missing_ok=True)
            said.append(f"user {user} removed (not in the team file)")
    except MlflowException as err:
        raise TrackingError(f"{uri}: applying the team failed ({one_line(err)})") from None
    except OSError as err:
        raise TrackingError(f"{uri}: applying the team failed ({reason(err)})") from None
    return said
