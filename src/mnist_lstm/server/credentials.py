"""The server's secrets on disk: generated once, readable by their owner only from the moment they
exist (never written world-readable and chmod'ed afterwards), under `<state>/secrets/` (0700).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRETS = "secrets"


def folder(state: Path) -> Path:
    """`<state>/secrets`, created private (0700) if missing."""
    path = state / SECRETS
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode is masked by the umask
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file that is 0600 from creation; replaces an existing one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def generated(path: Path, nbytes: int = 24) -> str:
    """The secret kept in `path`, generated (URL-safe random) the first time."""
    if not path.exists():
        write_private(path, secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
