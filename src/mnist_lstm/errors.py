"""User-facing errors: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT death


class UserError(Exception):
    """A mistake the user can fix (bad params, data or store); the message says how."""

    exit_code = EXIT_USER_ERROR


def one_line(
    err: BaseException | str, last: bool = False, limit: int = 200, default: str = ""
) -> str:
    """An error (or a tool's output) as one short line for an `error: ...` message: its first
    non-empty line (`last`: its last, where a tool prints the cause at the end), cut at `limit`
    characters. Without any text: `default`, else the exception's type."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines:
        return lines[-1 if last else 0][:limit]
    return default or ("" if isinstance(err, str) else type(err).__name__)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


# Why a SIGTERM this process sent itself came (see watch_dvc); otherwise the signal's name alone.
_self_sent: list[str] = []


def _signal_text(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"{name}: {_self_sent[0]}" if _self_sent else name


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(_signal_text(signum))


def _dvc_ancestor():
    """The `dvc` process that runs this stage (DVC sets DVC_STAGE for a stage's command), or None.

    DVC starts the command through a shell (`/bin/sh -c`, which does not exec it), so the stage's
    parent is the shell and `dvc` is further up: the first ancestor whose command is `dvc` or
    `python -m dvc`."""
    if not os.environ.get("DVC_STAGE"):
        return None
    import psutil

    try:
        for process in psutil.Process().parents():
            argv = process.cmdline()
            names = [os.path.basename(arg).removesuffix(".exe") for arg in argv[:2]]
            if "dvc" in names or argv[1:3] == ["-m", "dvc"]:
                return process
    except psutil.Error:
        return None
    return None


def watch_dvc(poll_s: float = 1.0) -> None:
    """A stage ends itself, as on its own SIGTERM, when the `dvc` that runs it is gone.

    SIGTERM to `dvc repro` alone (`kill <pid>`, a supervisor) kills DVC at once: it has no handler
    and does not pass the signal on, and the shell between it and the stage waits on. The stage
    trained on, reparented, for as long as it had epochs (measured: still at epoch 43 a minute
    later), and would have written its outputs and logged its run behind DVC's back. Polled from a
    daemon thread: psutil's is_running() also tells a reused pid apart."""
    dvc = _dvc_ancestor()
    if dvc is None:
        return

    def watch() -> None:
        while dvc.is_running():
            time.sleep(poll_s)
        _self_sent.append(f"dvc (pid {dvc.pid}), which ran this stage, ended")
        # The SIGTERM handler run in the main thread, as a real signal's is (also on Windows,
        # where os.kill would end the process on the spot, unwinding nothing).
        _thread.interrupt_main(signal.SIGTERM)

    threading.Thread(target=watch, name="watch-dvc", daemon=True).start()


def _restart_system_calls() -> None:
    # The kernel hands a process's SIGTERM/SIGINT to any of its threads, and Python installs
    # handlers without SA_RESTART: a TensorFlow or oneDNN worker's blocking call would fail with
    # EINTR. With it the call resumes; the handler itself still runs in the main thread.
    if not hasattr(signal, "siginterrupt"):  # Windows: no EINTR to restart from
        return
    for signum in INTERRUPTS:
        signal.siginterrupt(signum, False)


class HeldInterrupts:
    """SIGINT and SIGTERM recorded, not raised where they land. Calling it (at a point where
    unwinding is safe) raises the first one held as KeyboardInterrupt; `release()` gives the
    previous handlers back early and raises what is held."""

    def __init__(self) -> None:
        self._held: list[str] = []
        self._previous = {signum: signal.signal(signum, self._hold) for signum in INTERRUPTS}
        _restart_system_calls()

    def _hold(self, signum: int, frame: object) -> None:
        self._held.append(_signal_text(signum))

    def __call__(self) -> None:
        if self._held:
            raise KeyboardInterrupt(self._held[0])

    def restore(self) -> None:
        """The handlers as they were before; a signal from now on acts at once."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            _restart_system_calls()
        self._previous = {}

    def release(self) -> None:
        self.restore()
        self()


@contextlib.contextmanager
def interrupts_held() -> Iterator[HeldInterrupts]:
    """Within the block (or until it releases them), SIGINT and SIGTERM are held, not raised where
    they land; the block calls the yielded object at points where unwinding is safe, and it raises
    KeyboardInterrupt there. A signal still held when the block ends is raised after it.

    For Keras' `fit`: an interrupt raised at an arbitrary bytecode can land inside TensorFlow's
    own Python code -- creating an epoch's dataset iterator, say -- and leave its C++ state half
    built: about 3 in 8 SIGTERMs mid-training ended in a glibc heap-corruption abort (status -6)
    instead of the clean exit below. Checked between steps, it stops within one call of
    `steps_per_execution` steps.
    """
    held = HeldInterrupts()
    try:
        yield held
    finally:
        held.restore()
    held()


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a stage's main(): a UserError becomes `error: <message>` and its exit status (1).

    SIGTERM (what DVC, CI runners and `kill` send) is handled like Ctrl-C: it unwinds the stage
    through its `with` blocks, so temp files are removed and the MLflow run ends KILLED. Run by
    DVC, the stage does the same when the `dvc` process is gone (watch_dvc).
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        _restart_system_calls()
        watch_dvc()
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
