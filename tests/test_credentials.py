"""Secrets, certificates and the team file of the tracking server, and how a client says what the
server refused -- each in seconds, against real TLS on 127.0.0.1 where a handshake is involved.
(The server itself, with PostgreSQL and hosts on a network: tests/test_access.py.)"""

from __future__ import annotations

import http.server
import os
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import BIN


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_private_from_creation_even_with_an_open_umask(tmp_path):
    from mnist_lstm.server import credentials

    previous = os.umask(0)
    try:
        folder = credentials.folder(tmp_path)
        first = credentials.generated(folder / "admin-password")
        again = credentials.generated(folder / "admin-password")
    finally:
        os.umask(previous)
    assert first == again and len(first) >= 24  # generated once, kept
    assert mode(folder) == 0o700 and mode(folder / "admin-password") == 0o600


def test_the_certificate_follows_the_address_and_the_authority_stays(tmp_path):
    from cryptography import x509

    from mnist_lstm.server import tls

    first = tls.server_certificate(tmp_path, "10.1.2.3")
    ca = first.trust.read_bytes()
    same = tls.server_certificate(tmp_path, "10.1.2.3")
    assert same.cert.read_bytes() == first.cert.read_bytes()  # nothing made twice
    moved = tls.server_certificate(tmp_path, "10.9.9.9")
    cert = x509.load_pem_x509_certificate(moved.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.9.9.9"]
    assert moved.trust.read_bytes() == ca  # teammates keep trusting the same CA
    assert mode(moved.key) == 0o600 and mode(tmp_path / "tls" / "ca.key") == 0o600


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users:\n  alice: admin\n", "role must be one of reader, trainer, promoter"),
        ("users:\n  al: reader\n", "4-64 letters"),
        ("users:\n  admin: reader\n", "not 'admin'"),
        ("people:\n  alice: reader\n", "one mapping `users:`"),
        ("users: [alice]\n", "one mapping `users:`"),
    ],
)
def test_a_wrong_team_file_is_named_with_what_to_write(tmp_path, text, message):
    from mnist_lstm.errors import UserError
    from mnist_lstm.server import team

    path = tmp_path / "team.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as caught:
        team.read(path)
    assert str(path) in str(caught.value)


def test_the_repos_team_file_is_valid_and_empty():
    from conftest import REPO
    from mnist_lstm.server import team

    assert team.read(REPO / "team.yaml") == {}


class _Https:
    """A real HTTPS endpoint on 127.0.0.1 whose certificate is for `host`, signed by a CA made
    in `state` (the server's own tls module)."""

    def __init__(self, state: Path, host: str) -> None:
        from mnist_lstm.server import tls

        self.certificate = tls.server_certificate(state, host)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate.cert, self.certificate.key)
        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.uri = f"https://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        self.httpd.shutdown()


def _connect(uri: str, **env: str) -> subprocess.CompletedProcess:
    """What every stage does first, in a fresh process with exactly this environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    code = (
        "import sys; from mnist_lstm.errors import exits_cleanly; from mnist_lstm import tracking;"
        "sys.exit(exits_cleanly(lambda: tracking.connect(attempts=1) and 0)())"
    )
    return subprocess.run(
        [str(BIN / "python"), "-c", code],
        env={**clean, "MLFLOW_TRACKING_URI": uri, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    return line


@pytest.mark.slow
def test_tls_refusals_are_one_line_that_says_what_to_set(tmp_path):
    server = _Https(tmp_path, "10.9.9.9")  # a certificate for another address
    try:
        untrusted = _error(_connect(server.uri))
        other = _error(
            _connect(server.uri, MLFLOW_TRACKING_SERVER_CERT_PATH=str(server.certificate.trust))
        )
        # Set but empty: MLflow would hand requests verify="" and check nothing; here it is unset.
        empty = _error(_connect(server.uri, MLFLOW_TRACKING_SERVER_CERT_PATH=""))
    finally:
        server.close()
    assert "TLS certificate is not trusted here" in untrusted
    assert "set MLFLOW_TRACKING_SERVER_CERT_PATH" in untrusted
    assert "TLS certificate is for another address" in other and "127.0.0.1" in other
    assert "TLS certificate is not trusted here" in empty
    # None of them is an outage to wait out: no "set MNIST_LSTM_TRACKING=offline" advice.
    assert not any("offline" in line for line in (untrusted, other, empty))


def test_a_password_in_the_tracking_uri_is_refused_before_anything_is_sent(tmp_path):
    result = _connect("https://alice:s3cret-pass@127.0.0.1:9/")
    line = _error(result)
    assert "carries a user and password" in line and "MLFLOW_TRACKING_PASSWORD" in line
    assert "s3cret-pass" not in result.stderr + result.stdout


def test_mlflow_still_turns_an_empty_cert_path_into_no_verification():
    """Why store.py unsets an empty MLFLOW_TRACKING_SERVER_CERT_PATH: when MLflow stops handing
    requests `verify=""`, this fails and the workaround can go."""
    from mlflow.utils.rest_utils import MlflowHostCreds

    assert MlflowHostCreds("https://x", server_cert_path="").verify == ""
    probe = (
        "import os, mnist_lstm.tracking; print('MLFLOW_TRACKING_SERVER_CERT_PATH' in os.environ)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "MLFLOW_TRACKING_SERVER_CERT_PATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip() == "False", result.stderr


def test_a_wrong_team_file_stops_make_server_before_anything_starts(tmp_path):
    (tmp_path / "team.yaml").write_text("users:\n  alice: boss\n")
    state = tmp_path / "state"
    result = subprocess.run(
        [str(BIN / "python"), "-m", "mnist_lstm.server", "start", "--auth", "--state", str(state)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert _error(result) == (
        "error: team.yaml: user alice: role must be one of reader, trainer, promoter, got 'boss'"
    )
    assert not state.exists()  # no cluster, no server, no secrets
