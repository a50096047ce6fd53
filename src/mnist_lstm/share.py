"""`make share`: `dvc exp push`, in the order that never publishes half an experiment.

`dvc exp push` (DVC 3.67) pushes the experiments' git refs first and their data second. When the
DVC remote fails in between (an SSH host unreachable, a dropped link), the refs are already on the
git remote: a teammate's `dvc exp pull` takes the experiment for complete and only `dvc pull`
finds the data missing. Here the same two DVC operations run the other way round: every output
(and the run-cache) of the experiments goes to the DVC remote first, and only then their refs to
the git remote. A failure at either step exits 1 with one line; nothing anyone can pull is
incomplete, and running it again finishes the job (uploads are content-addressed and atomic per
file). tests/test_team.py checks DVC still pushes refs first; when it stops, use `dvc exp push`.

Before any upload, the git remote's experiment refs are compared with ours: where it already holds
a different experiment of the same name on the same baseline (a teammate's, or an earlier run
since removed here), git would refuse that ref -- and `dvc exp push` only reports it in its
result, so the push "succeeded". Share refuses the whole call there, before any data or ref of any
of the experiments is pushed; `--force` overwrites the remote's experiment. A teammate's push
landing between that check and ours is refused by git for that ref alone: the other refs of the
call go up whole (all their data went first), and share exits 1 naming it.

An SSH DVC remote is given up on when it does not answer within MNIST_LSTM_SHARE_TIMEOUT seconds
(or --timeout; default 30): a remote that drops packets would otherwise hold share for the OS's
TCP connect timeout (over two minutes here; DVC's own bound is 1800 s). The bound is a config
override of this process only: .dvc/config is not changed.

    python -m mnist_lstm.share [--git-remote origin] [--dvc-remote NAME] [--force]
                               [--timeout SECONDS] [EXP ...]

Without EXP: the experiments of the current commit, as `dvc exp push` does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mnist_lstm.errors import UserError, exits_cleanly, one_line

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.repo.experiments.refs import ExpRefInfo

TIMEOUT_ENV = "MNIST_LSTM_SHARE_TIMEOUT"
DEFAULT_TIMEOUT = 30
NOTHING_PUSHED = "nothing was pushed"


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and what it was raised from or during, outermost first."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def _reason(err: BaseException, timeout: int) -> str:
    """What a person can act on: the innermost cause's first line, or the bound that expired."""
    from fsspec.exceptions import FSTimeoutError

    causes = _causes(err)
    # fsspec cancels the connection at the bound and raises FSTimeoutError over a bare
    # CancelledError; it raises the same over the OS's own "[Errno 110] Connect call failed".
    if not str(causes[-1]) and any(isinstance(cause, FSTimeoutError) for cause in causes):
        return f"no answer within {timeout} s; {TIMEOUT_ENV}=SECONDS waits longer"
    return one_line(causes[-1])


def open_repo(dvc_remote: str | None, timeout: int) -> Repo:
    """The DVC project around the working directory; an SSH remote's connection bounded by
    `timeout` seconds through a config override of this process only."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo()
    except NotDvcRepoError:
        raise UserError(
            "share: not inside a DVC project (no .dvc folder here or above): run it in your "
            f"clone of the project; {NOTHING_PUSHED}"
        ) from None
    name = dvc_remote or repo.config["core"].get("remote")
    url = repo.config["remote"].get(name, {}).get("url", "")
    # Only DVC's SSH schema has `timeout`; other remotes would fail validation with it.
    if urlparse(url).scheme != "ssh":
        return repo
    repo.close()
    return Repo(config={"remote": {name: {"timeout": timeout}}})


def experiment_refs(repo: Repo, names: list[str]) -> list[ExpRefInfo]:
    """The refs `names` resolve to (default: the current commit's experiments)."""
    from dvc.repo.experiments.exceptions import AmbiguousExpRefInfo, UnresolvedExpNamesError
    from dvc.repo.experiments.push import exp_refs_from_names, exp_refs_from_rev
    from dvc.repo.experiments.utils import exp_refs_by_names, resolve_name

    if not names:
        refs = exp_refs_from_rev(repo.scm, ["HEAD"])
        if not refs:
            raise UserError(
                "share: no experiments of this commit to push: run one (`dvc exp run`), or name "
                f"them (`make share EXPS=...`; `dvc exp list --all-commits`); {NOTHING_PUSHED}"
            )
        return sorted(refs, key=str)
    try:
        return sorted(exp_refs_from_names(repo.scm, names), key=str)
    except UnresolvedExpNamesError:
        unknown = [name for name, ref in resolve_name(repo.scm, names).items() if ref is None]
        raise UserError(
            f"share: no experiment named {', '.join(map(repr, unknown))} in this clone: check "
            f"the name with `dvc exp list --all-commits --name-only`; {NOTHING_PUSHED}"
        ) from None
    except AmbiguousExpRefInfo:
        # resolve_name raises on the first name that several commits' experiments share and
        # none of them the current commit's; DVC's message spreads their refs over lines.
        head = repo.scm.get_rev()
        found = exp_refs_by_names(repo.scm, set(names))
        name, same = next(
            (name, found[name])
            for name in names
            if len(found[name]) > 1 and all(ref.baseline_sha != head for ref in found[name])
        )
        raise UserError(
            f"share: {name!r} names experiments of several commits "
            f"({', '.join(sorted(map(str, same)))}): pass one full ref instead, or check out the "
            f"commit it ran on; {NOTHING_PUSHED}"
        ) from None


def _git(repo: Repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=repo.scm.root_dir, capture_output=True, text=True, check=False
    )


def diverged(repo: Repo, git_remote: str, refs: list[ExpRefInfo]) -> list[ExpRefInfo]:
    """The refs git would refuse: the remote holds another commit under that name that ours does
    not descend from (git's own fast-forward rule, as `dvc exp push` applies it)."""
    listed = _git(repo, "ls-remote", "--refs", git_remote, "refs/exps/*")
    if listed.returncode != 0:
        raise UserError(
            f"share: git remote {git_remote!r} failed ({one_line(listed.stderr)}); "
            f"{NOTHING_PUSHED}: check `git remote -v` and run `make share` again"
        )
    theirs = {ref: sha for sha, ref in (line.split("\t", 1) for line in listed.stdout.splitlines())}
    refused = []
    for ref in refs:
        remote_sha = theirs.get(str(ref))
        if remote_sha is None or remote_sha == repo.scm.get_ref(str(ref)):
            continue
        # A remote commit missing here is no ancestor either: git refuses those too.
        if _git(repo, "merge-base", "--is-ancestor", remote_sha, str(ref)).returncode != 0:
            refused.append(ref)
    return refused


def _diverged_message(git_remote: str, refs: list[ExpRefInfo], what: str) -> str:
    names = ", ".join(repr(ref.name) for ref in refs)
    one = refs[0].name
    return (
        f"share: git remote {git_remote!r} already has a different experiment named {names}, "
        f"run from the same commit (a teammate's, or an earlier run of yours); {what}: rename "
        f"yours (`dvc exp rename {one} NEW-NAME`, or run it again with a new -n) and share "
        f"again, take theirs with `dvc exp pull --force {git_remote} {one}` (drops yours), or "
        f"overwrite theirs with `make share FORCE=1 EXPS={one}`"
    )


@contextlib.contextmanager
def _reported(where: str, timeout: int) -> Iterator[None]:
    """A failure of the DVC remote as one line; no ref has been pushed yet when it is used."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure: nothing was published
        raise UserError(
            f"share: {where} failed ({_reason(err, timeout)}); no experiment ref was pushed, "
            "so nobody can pull half of one: run `make share` again when the remote answers"
        ) from None


def share(
    git_remote: str,
    dvc_remote: str | None,
    names: list[str],
    force: bool = False,
    timeout: int = DEFAULT_TIMEOUT,
) -> dict[str, list[str]]:
    """Push `names` (default: the current commit's experiments): data first, then refs. Returns
    the experiment names by outcome: "pushed", "up_to_date" and (with `force`) "overwritten"."""
    from dvc.config import NoRemoteError, RemoteNotFoundError
    from dvc.repo.experiments.push import _push_cache

    with open_repo(dvc_remote, timeout) as repo:
        try:
            remote = repo.cloud.get_remote(dvc_remote)
        except RemoteNotFoundError:
            raise UserError(
                f"share: no DVC remote named {dvc_remote!r} (`dvc remote list` shows them); "
                f"{NOTHING_PUSHED}"
            ) from None
        except NoRemoteError:
            raise UserError(
                "share: no default DVC remote: set the team's with `dvc remote add -d shared URL` "
                f"(docs/team.md) or pass --dvc-remote NAME; {NOTHING_PUSHED}"
            ) from None
        refs = experiment_refs(repo, names)
        where = f"DVC remote {remote.name!r} ({repo.config['remote'][remote.name]['url']})"
        with _reported(where, timeout):
            # Reaching the remote first gives the real reason (no route, refused key) in one
            # line, instead of DVC's "N files failed to upload".
            remote.fs.exists(remote.path)
        overwritten = diverged(repo, git_remote, refs)
        if overwritten and not force:
            raise UserError(_diverged_message(git_remote, overwritten, NOTHING_PUSHED))
        with _reported(where, timeout):
            _push_cache(repo, refs, dvc_remote=dvc_remote, run_cache=True)
        try:
            pushed = repo.experiments.push(
                git_remote, exp_names=[str(ref) for ref in refs], force=force
            )
        except Exception as err:  # noqa: BLE001
            raise UserError(
                f"share: git remote {git_remote!r} failed ({_reason(err, timeout)}); the data is "
                f"on the {where}, the refs are not: run `make share` again when it answers"
            ) from None
        # A teammate's push between our check and ours: git refused only those refs (the others
        # went in the same call, each whole, since all the data went first).
        late = [ref for ref in refs if ref.name in pushed.get("diverged", [])]
        if late:
            others = ", ".join(ref.name for ref in refs if ref not in late) or "nothing else"
            what = f"it was pushed while share ran ({others} went up whole, data and ref)"
            raise UserError(_diverged_message(git_remote, late, what))
        return {
            "pushed": sorted(pushed.get("success", [])),
            "up_to_date": sorted(pushed.get("up_to_date", [])),
            "overwritten": sorted(ref.name for ref in overwritten),
        }


def _seconds(value: str, source: str = "--timeout") -> int:
    if not value.isdigit() or int(value) == 0:
        raise UserError(f"share: {source} must be a whole number of seconds > 0, got {value!r}")
    return int(value)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-remote", default="origin")
    parser.add_argument("--dvc-remote", help="default: the project's default DVC remote")
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite an experiment of the same name on the git remote (a teammate's)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        help=f"seconds to wait for an SSH DVC remote to answer (default: ${TIMEOUT_ENV} or "
        f"{DEFAULT_TIMEOUT})",
    )
    parser.add_argument("experiments", nargs="*", metavar="EXP")
    args = parser.parse_args(argv)
    timeout = args.timeout or _seconds(
        os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT)), TIMEOUT_ENV
    )
    from dvc.exceptions import DvcException

    try:
        outcome = share(args.git_remote, args.dvc_remote, args.experiments, args.force, timeout)
    except DvcException as err:  # any other of DVC's own (a broken .dvc/config, ...)
        raise UserError(f"share: {_reason(err, timeout)}; {NOTHING_PUSHED}") from None
    pushed, there = outcome["pushed"], outcome["up_to_date"]
    if pushed:
        line = f"share: pushed {', '.join(pushed)} (data, then refs to {args.git_remote!r})"
        line += f"; already there: {', '.join(there)}" if there else ""
    else:
        line = f"share: {', '.join(there)} already on {args.git_remote!r} (refs and data)"
    if outcome["overwritten"]:
        line += f"; replaced the remote's {', '.join(outcome['overwritten'])} (--force)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
