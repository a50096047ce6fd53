"""`make share`: `dvc exp push`, in the order that never publishes half an experiment.

`dvc exp push` (DVC 3.67) pushes the experiments' git refs first and their data second. When the
DVC remote fails in between (an SSH host unreachable, a dropped link), the refs are already on the
git remote: a teammate's `dvc exp pull` takes the experiment for complete and only `dvc pull`
finds the data missing. Here the same two DVC operations run the other way round: every output
(and the run-cache) of the experiments goes to the DVC remote first, and only then their refs to
the git remote. A failure at either step exits 1 with one line; nothing anyone can pull is
incomplete, and running it again finishes the job (uploads are content-addressed and atomic per
file). tests/test_team.py checks DVC still pushes refs first; when it stops, use `dvc exp push`.

    python -m mnist_lstm.share [--git-remote origin] [--dvc-remote NAME] [EXP ...]

Without EXP: the experiments of the current commit, as `dvc exp push` does.
"""

from __future__ import annotations

import argparse
import sys

from mnist_lstm.errors import UserError, exits_cleanly, one_line


def _reason(err: BaseException) -> str:
    """The innermost cause's first line: what a person can act on."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return one_line(err)


def share(git_remote: str, dvc_remote: str | None, names: list[str]) -> list[str]:
    """Push `names` (default: the current commit's experiments): data first, then refs. Returns
    the experiment names pushed."""
    from dvc.repo import Repo
    from dvc.repo.experiments.push import _push_cache, exp_refs_from_names, exp_refs_from_rev

    with Repo() as repo:
        refs = (
            exp_refs_from_names(repo.scm, names) if names else exp_refs_from_rev(repo.scm, ["HEAD"])
        )
        if not refs:
            raise UserError("share: no experiments of this commit to push (see `dvc exp show`)")
        remote = repo.cloud.get_remote(dvc_remote)
        where = f"DVC remote {remote.name!r} ({repo.config['remote'][remote.name]['url']})"
        try:
            # Reaching the remote first gives the real reason (no route, refused key) in one
            # line, instead of DVC's "N files failed to upload".
            remote.fs.exists(remote.path)
            _push_cache(repo, refs, dvc_remote=dvc_remote, run_cache=True)
        except Exception as err:  # noqa: BLE001 - any failure: nothing was published
            raise UserError(
                f"share: {where} failed ({_reason(err)}); no experiment ref was pushed, so nobody "
                "can pull half of one: run `make share` again when the remote answers"
            ) from None
        try:
            repo.experiments.push(git_remote, exp_names=[str(ref) for ref in refs])
        except Exception as err:  # noqa: BLE001
            raise UserError(
                f"share: git remote {git_remote!r} failed ({_reason(err)}); the data is on the "
                f"{where}, the refs are not: run `make share` again when it answers"
            ) from None
        return sorted(ref.name for ref in refs)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-remote", default="origin")
    parser.add_argument("--dvc-remote", help="default: the project's default DVC remote")
    parser.add_argument("experiments", nargs="*", metavar="EXP")
    args = parser.parse_args(argv)
    pushed = share(args.git_remote, args.dvc_remote, args.experiments)
    print(f"share: pushed {', '.join(pushed)} (data, then refs to {args.git_remote!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
