"""User-facing errors: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT death


class UserError(Exception):
    """A mistake the user can fix (bad params, data or store); the message says how."""

    exit_code = EXIT_USER_ERROR


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a stage's main(): a UserError becomes `error: <message>` and its exit status (1).

    SIGTERM (what DVC, CI runners and `kill` send) is handled like Ctrl-C: it unwinds the stage
    through its `with` blocks, so temp files are removed and the MLflow run ends KILLED.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt as err:
            signal_name = str(err) or "SIGINT"
            print(f"error: interrupted ({signal_name}); no output was written", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper
