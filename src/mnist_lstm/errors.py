"""User-facing errors: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix (bad params, bad data, unreachable store); the message says how."""


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a stage's main(): a UserError becomes `error: <message>` and exit status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    return wrapper
