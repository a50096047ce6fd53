"""Where runs live: the MLflow store a stage logs to, the experiment in it, and how a failing
store is told from a refused request.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else the repo's own sqlite store `mlflow.db`.
`MNIST_LSTM_TRACKING=offline` keeps every write in the spool until `make sync` (outage.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Set before mlflow is imported: it reads these once. The project must work fully offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow's HTTP client retries 7 times with exponential backoff (minutes) by default, each try
# waiting up to 120 s. A server that stops answering must instead fail the stage in seconds
# before training, and during training hand the run's writes to the spool (outage.py) within
# 10 s of the first write that stalls. Every request MLflow sends it -- REST calls and proxied
# artifact uploads alike go through rest_utils.http_request -- gets:
#   connect 2 s (CONNECT_TIMEOUT below): a server that is up answers a SYN in milliseconds; 2 s
#     still covers one lost SYN, which Linux resends after 1 s. urllib3 sends a request under
#     the same timeout: each 16 KiB block of an upload must leave within 2 s (8 KiB/s or more);
#   read 7 s: a healthy but loaded server (a PostgreSQL store, a model upload landing in its
#     artifact store) gets 7 s to begin its answer, counted from the end of the upload;
#   1 retry, sent at once: urllib3 >= 2 backs off only before a second retry.
# A server that drops packets: the first try waits 7 s on a kept-alive connection (2 s on a new
# one); the retry needs a new connection, 2 s: at most 7 + 2 = 9 s, then the spool. (MLflow's
# old 15 s and 2 retries made that 15 + 15 + 2 + jitter + 15, about 50 s, epochs held up.)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
# Stage logs and the predict CLI's output stay readable: no per-file download bars.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Our own lines say where a run is (or waits); MLflow's "View run at" would repeat it per stage.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow hands `requests` the variable's text as `verify`: set but empty, it turns certificate
# checking off (verify=""). Empty means unset here (test_access watches MLflow still does this).
if os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH", None) == "":
    del os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
# A store going down is reported once, in one line (RunWriter), not as a warning per HTTP retry.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
# ... nor as the traceback MLflow logs for a database error (sqlite locked past its timeout).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.request_utils import TCPKeepAliveHTTPAdapter  # noqa: E402

from mnist_lstm.errors import UserError, one_line  # noqa: E402

# MLflow hands `requests` one number, MLFLOW_HTTP_REQUEST_TIMEOUT, for both connecting and
# reading (the variable is an int); a connection gets this much at most (arithmetic above).
CONNECT_TIMEOUT = 2.0
_mlflow_send = TCPKeepAliveHTTPAdapter.send


def _send_connecting_fast(
    self: TCPKeepAliveHTTPAdapter, request: Any, timeout: Any = None, **kwargs: Any
) -> Any:
    """MLflow's HTTP adapter (every session it builds mounts it), with a short connect timeout.
    A hook on a library internal: test_stall fails the day MLflow's sessions stop using it."""
    if isinstance(timeout, int | float):
        timeout = (min(CONNECT_TIMEOUT, timeout), timeout)
    return _mlflow_send(self, request, timeout=timeout, **kwargs)


TCPKeepAliveHTTPAdapter.send = _send_connecting_fast

EXPERIMENT = "mnist-lstm"
# Lineage tags: the md5 hashes dvc.lock records for each stage's data output.
TAG_RAW_MD5 = "dvc.raw_md5"
TAG_PROCESSED_MD5 = "dvc.processed_md5"
TAG_MODEL_MD5 = "dvc.model_md5"
# The LSTM kernel training used (onednn or keras): `lstm_kernel: auto` differs by machine.
TAG_LSTM_KERNEL = "train.lstm_kernel_used"
EVAL_PREFIX = "eval/"
TRACKING_MODE_ENV = "MNIST_LSTM_TRACKING"
# The port `make ui` serves the UI on (the Makefile's UI_PORT exports it), read by every link
# printed to a store without a UI of its own.
UI_PORT_ENV = "MNIST_LSTM_UI_PORT"
DEFAULT_UI_PORT = "5000"
# Which MLflow UI view an experiment opens in (3.x tells GenAI from model training by it).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI opens an experiment on its GenAI overview, whatever its experiment kind tag,
# unless the link asks for the model-training view (`make ui-check` watches that this is still so).
TRAINING_VIEW = "workflowType=machine_learning"
_EXPS_TEMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
# Store answers that are the request's fault, not the store's: never spooled, they would fail again.
_CLIENT_ERRORS = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "INVALID_STATE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ENDPOINT_NOT_FOUND",
    }
)
# What an outage looks like in an error's text, and how a line says it.
_OUTAGE_SIGNS = (
    (("Connection refused", "NewConnectionError", "Failed to establish"), "connection refused"),
    (("timed out", "Timeout", "ConnectTimeout"), "timed out"),
    (("database is locked",), "database is locked"),
    (("Name or service not known", "nodename nor servname"), "host not found"),
    (("RemoteDisconnected", "Connection aborted", "Connection reset"), "connection dropped"),
    (("503", "502", "504"), "server unavailable"),
)
# TLS failures are a setting to fix, never an outage to wait out: (sign, what the line says).
_TLS_SIGNS = (
    ("mismatch", "its TLS certificate is for another address"),
    ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted here"),
    ("WRONG_VERSION_NUMBER", "it does not speak HTTPS (is the URI http://?)"),
    ("TLS CA certificate bundle", "MLFLOW_TRACKING_SERVER_CERT_PATH names no readable certificate"),
    ("SSLError", "the TLS handshake failed"),
)
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
CERT_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"
# What a refused request was trying to do, by its REST endpoint, and which role may do it.
_ACTIONS = (
    ("runs/create", "create a run", "trainer"),
    ("runs/", "write to a run", "trainer"),
    ("logged-models", "log a model", "trainer"),
    ("artifacts", "write an artifact", "trainer"),
    ("experiments/create", "create an experiment", "admin"),
    ("experiments/set-experiment-tag", "tag the experiment", "admin"),
    ("registered-models/alias", "move a registered model's alias", "promoter"),
    ("model-versions/create", "register a model version", "promoter"),
    ("registered-models/create", "create a registered model", "admin"),
    ("", "read", "reader"),
)


class TrackingError(UserError):
    """The MLflow store cannot be used; raised before any training starts."""

    def __init__(self, message: str, reason: str = "", refused: bool = False) -> None:
        super().__init__(message)
        self.reason = reason or message
        # The server answered no (login, permission, TLS trust): waiting won't help.
        self.refused = refused


def project_root(cwd: Path | None = None) -> Path:
    """The repo root, also from inside the temporary copies `dvc exp run --queue` works in."""
    cwd = Path(cwd or os.getcwd()).resolve()
    text = str(cwd)
    if _EXPS_TEMP in text:
        return Path(text.split(_EXPS_TEMP, 1)[0])
    return cwd


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the repo's own sqlite store `mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def offline() -> bool:
    """MNIST_LSTM_TRACKING=offline: log to the spool from the start, `make sync` later."""
    value = os.environ.get(TRACKING_MODE_ENV, "online").strip().lower() or "online"
    if value not in ("online", "offline"):
        raise UserError(f"{TRACKING_MODE_ENV} must be online or offline, got {value!r}")
    return value == "offline"


def tracking_uri_checked() -> str:
    """The tracking URI, refused when it carries a password: it would land in logs and spools."""
    uri = tracking_uri()
    if urllib.parse.urlsplit(uri).password is not None:
        raise UserError(
            "MLFLOW_TRACKING_URI carries a user and password (user:pass@): they would land in "
            f"logs and spools; remove them and set {USERNAME_ENV} and {PASSWORD_ENV} instead"
        )
    return uri


def _tls_problem(err: BaseException) -> str | None:
    text = str(err)
    for sign, said in _TLS_SIGNS:
        if sign in text:
            return said
    return None


def is_outage(err: BaseException) -> bool:
    """A failure of the store or the way to it (down, unreachable, locked past its timeout) -- not
    a refused login, a missing permission or an untrusted certificate, which waiting won't fix."""
    if _tls_problem(err):
        return False
    if isinstance(err, MlflowException):
        return err.error_code not in _CLIENT_ERRORS
    return isinstance(err, OSError)


def refusal(err: BaseException, uri: str | None = None) -> TrackingError | None:
    """One line for a request the server refused (login, permission, TLS); None for others."""
    uri = uri or tracking_uri()
    user = os.environ.get(USERNAME_ENV)
    code = getattr(err, "error_code", None)
    if code == "UNAUTHENTICATED":
        if not user:
            said = f"asks who you are (401); set {USERNAME_ENV} and {PASSWORD_ENV}"
        else:
            said = (
                f"refused user {user!r} (401: wrong password or no such user); check "
                f"{USERNAME_ENV} and {PASSWORD_ENV}"
            )
    elif code == "PERMISSION_DENIED":
        endpoint = re.search(r"endpoint (\S+)", str(err))
        path = endpoint.group(1) if endpoint else ""
        action, role = next((a, r) for sign, a, r in _ACTIONS if sign in path)
        who = f"user {user!r}" if user else "an anonymous client"
        said = (
            f"{who} may not {action} (403 permission denied); a {role} may: ask the server's "
            "admin (team.yaml)"
        )
    elif tls := _tls_problem(err):
        detail = re.search(r"\[SSL[^]]*\] ?(.+?)\.? \(_ssl", str(err))
        said = f"{tls} ({detail.group(1).strip() if detail else reason(err)})"
        if "trusted" in tls:
            said += f"; set {CERT_ENV} to the server's CA certificate (`make server` prints it)"
    else:
        return None
    return TrackingError(f"MLflow tracking URI {uri}: {said}", refused=True)


@contextlib.contextmanager
def refusals(uri: str | None = None) -> Iterator[None]:
    """Inside: a request the server refuses (login, permission, TLS) ends in its one line."""
    try:
        yield
    except MlflowException as err:
        refused = refusal(err, uri)
        if refused:
            raise refused from None
        raise


def reason(err: BaseException) -> str:
    """A short reason: `connection refused` rather than urllib3's paragraph."""
    text = str(err)
    for signs, said in _OUTAGE_SIGNS:
        if any(sign in text for sign in signs):
            return said
    return one_line(err)


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local sqlite store (not wherever the process happens to run)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


# How long a process waits for another one creating the same sqlite store (seconds).
STORE_CREATION_WAIT = 120


@contextlib.contextmanager
def _one_opener_at_a_time(uri: str) -> Iterator[None]:
    """One process at a time opens a sqlite store. Processes opening a fresh store at once
    (parallel `dvc exp` workers on a new clone) each ran MLflow's schema migrations on it and
    failed half-way (`duplicate column name: step`, `No such index ...`: 3 runs of 3 with four
    processes); the first one creates it while the others wait, then they find it made. The lock
    file sits beside the store (`.mlflow.db.lock`): whoever can create the store can create it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock, Timeout

    db = Path(urllib.parse.unquote(uri[len("sqlite:///") :].split("?", 1)[0]))
    lock = FileLock(db.parent / f".{db.name}.lock")
    try:
        lock.acquire(timeout=STORE_CREATION_WAIT)
    except Timeout:
        raise TrackingError(
            f"MLflow tracking URI {uri}: cannot be used (another process has been creating it "
            f"for {STORE_CREATION_WAIT} s; lock {lock.lock_file})",
            "store creation timed out",
        ) from None
    except OSError:  # the folder is missing or not writable: MLflow says so better, next
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def connect(attempts: int = 5, uri: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists, marked as a model-training
    experiment for MLflow's UI; fail fast, naming the URI, if the store cannot be used.

    A fresh sqlite store is created by one process at a time (_one_opener_at_a_time); a race to
    create the experiment on a new server is retried a few times instead of failing a run.
    """
    uri = uri or tracking_uri_checked()
    mlflow.set_tracking_uri(uri)
    with _one_opener_at_a_time(uri):
        return _open(uri, attempts)


def _open(uri: str, attempts: int) -> str:
    for attempt in range(attempts):
        try:
            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                with contextlib.suppress(MlflowException):  # another writer created it meanwhile
                    client.create_experiment(
                        EXPERIMENT,
                        artifact_location=_artifact_location(uri),
                        tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                    )
                experiment = client.get_experiment_by_name(EXPERIMENT)
            if TAG_EXPERIMENT_KIND not in experiment.tags:  # a store made before the tag
                client.set_experiment_tag(
                    experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
                )
            mlflow.set_experiment(experiment_id=experiment.experiment_id)
            return experiment.experiment_id
        except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
            refused = refusal(err, uri)
            if refused:
                raise refused from None
            text = str(err)
            if attempt + 1 < attempts and ("locked" in text or "already exists" in text):
                time.sleep(0.5 * (attempt + 1))
                continue
            why = reason(err)
            raise TrackingError(
                f"MLflow tracking URI {uri}: cannot be used ({why}); start it, or set "
                f"{TRACKING_MODE_ENV}=offline to keep the run locally and `make sync` later",
                why,
            ) from None
    raise AssertionError("unreachable")


def ui_base(uri: str | None = None) -> str:
    """The UI that shows `uri`: a tracking server's own, else the one `make ui` starts on
    127.0.0.1 and MNIST_LSTM_UI_PORT (default 5000)."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    port = os.environ.get(UI_PORT_ENV, "").strip() or DEFAULT_UI_PORT
    if not port.isdigit():
        raise UserError(f"{UI_PORT_ENV} must be a port number, got {port!r}")
    return f"http://127.0.0.1:{port}"


def experiment_url(uri: str | None = None) -> str:
    """The experiment's training runs in the UI (what `make ui` prints); experiment 0 (MLflow's
    Default) while the store does not answer or holds no run yet."""
    uri = uri or tracking_uri()
    try:
        experiment = mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    except Exception:  # noqa: BLE001 - only the link's experiment id is at stake
        experiment = None
    experiment_id = experiment.experiment_id if experiment else "0"
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def run_url(run_id: str) -> str:
    """Where the run is in the UI that `make ui` starts (or the tracking server's own UI)."""
    uri = tracking_uri()
    experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"
