"""Send the MLflow writes an outage (or MNIST_LSTM_TRACKING=offline) left in the spool.

`python -m mnist_lstm.sync` (`make sync`) replays every waiting run into its store, in order, and
ends it as its stage ended (FINISHED, FAILED or KILLED); `--status` only lists what waits. Safe to
run twice, or to interrupt and run again: nothing is logged twice. A spool that cannot be read is
moved to `.tracking-spool/quarantine/`, never deleted, and the others are sent. Exit 1 while work
is left undone (a store does not answer: its runs keep waiting; a spool waits in quarantine), 130
when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from mnist_lstm.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, exits_cleanly
from mnist_lstm.tracking import outage


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status", action="store_true", help="list waiting runs; send nothing")
    args = parser.parse_args(argv)

    if args.status:
        lines = outage.waiting()
        print("\n".join(f"sync: {line}" for line in lines) or "sync: nothing waits")
        return 0
    said = []

    def say(line: str) -> None:
        said.append(line)
        print(f"sync: {line}", flush=True)

    try:
        complete = outage.sync(say=say)
    except KeyboardInterrupt as err:
        print(
            f"error: sync interrupted ({err or 'SIGINT'}) between two writes; what was sent "
            "stays sent: `make sync` again resumes",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not said:
        print("sync: nothing waits")
    return 0 if complete else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
