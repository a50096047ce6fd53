"""HTTPS for the tracking server: a small certificate authority of its own under `<state>/tls`,
and a server certificate for the address it binds, signed by it.

Teammates trust the CA's certificate (`MLFLOW_TRACKING_SERVER_CERT_PATH=<state>/tls/ca.pem`);
the CA stays when the address changes, so only the server certificate is made again. A team with
its own certificate passes it instead (`--tls-cert`, `--tls-key`). Built on `cryptography`, the
library MLflow itself depends on.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mnist_lstm.errors import UserError
from mnist_lstm.server import credentials

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate


class Certificate(NamedTuple):
    cert: Path
    key: Path
    # What clients set MLFLOW_TRACKING_SERVER_CERT_PATH to; None for the user's own certificate.
    trust: Path | None


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    credentials.write_private(path, pem.decode())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _authority(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key
    key = _key()
    name = _name(f"mnist-lstm tracking server CA ({socket.gethostname()})")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _names(host: str) -> list[x509.GeneralName]:
    """The subject alternative names a client checks the address it dials against."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [x509.DNSName(host)]
    if not address.is_unspecified:
        return [x509.IPAddress(address)]
    # 0.0.0.0 / ::: every address of this host, and its name.
    import psutil

    found = {ipaddress.ip_address("127.0.0.1")}
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.add(ipaddress.ip_address(entry.address.split("%")[0]))
    return [
        x509.DNSName(socket.gethostname()),
        *(x509.IPAddress(a) for a in sorted(found, key=str)),
    ]


def _covers(cert_path: Path, authority: x509.Certificate, names: list[x509.GeneralName]) -> bool:
    if not cert_path.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != authority.subject or cert.not_valid_after_utc < _now() + datetime.timedelta(
        days=30
    ):
        return False
    have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(have) == set(names)


def server_certificate(state: Path, host: str) -> Certificate:
    """The state's CA and a certificate for `host` signed by it (made again when `host` changed,
    or when it expires within 30 days)."""
    folder = state / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    authority, authority_key = _authority(folder)
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    names = _names(host)
    if not (_covers(cert_path, authority, names) and key_path.exists()):
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(authority.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(authority_key, hashes.SHA256())
        )
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Certificate(cert_path, key_path, folder / "ca.pem")


def own_certificate(cert: Path, key: Path) -> Certificate:
    """The team's own certificate and key, checked to exist and to be a PEM certificate."""
    for path in (cert, key):
        if not path.is_file():
            raise UserError(f"{path}: no such file (TLS_CERT= and TLS_KEY= name PEM files)")
    try:
        x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        raise UserError(f"{cert}: not a PEM certificate (TLS_CERT=)") from None
    return Certificate(cert.resolve(), key.resolve(), None)
