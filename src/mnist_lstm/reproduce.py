"""`make reproduce REF=…`: rebuild a registered model from its name and compare the bytes.

`python -m mnist_lstm.reproduce [RUN_ID | models:/NAME/VERSION | models:/NAME@ALIAS]` (default
`models:/mnist-lstm@champion`). In a temporary git worktree at the run's commit -- the experiment's
own commit when the run came from a `dvc exp` this repo holds (`dvc exp pull`), else the commit the
run recorded, with the run's logged params written over its params.yaml -- it runs
`dvc repro train`, which takes what DVC's cache and remote hold (the lock's outputs, the run-cache)
and trains only what they lack. Then it compares the rebuilt model file's md5 with the registered
model's bytes (downloaded and checked against the md5 recorded at registration) and prints one
verdict:

    models:/mnist-lstm@champion (version 2): reproduced bit for bit (restored from the cache)
    models:/mnist-lstm@champion (version 2): reproduced bit for bit (retrained in 41 s)
    models:/mnist-lstm@champion (version 2): not reproduced (…); recorded inputs that differ now:
      - tensorflow: 2.20.0 when it trained, 2.21.0 here
      …

exit 0 for the first two, 1 otherwise. The user's workspace is never touched: the worktree shares
only the DVC cache (content-addressed: a rebuild adds what it made), and is removed on success,
failure and Ctrl-C/SIGTERM. A retrain logs nothing to the team's store (MNIST_LSTM_TRACKING=offline
into the worktree's own spool, removed with it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import configobj
import psutil
import yaml

from mnist_lstm import tracking
from mnist_lstm.contracts import md5_file
from mnist_lstm.errors import UserError, exits_cleanly, one_line
from mnist_lstm.lineage import LOCKED_OUTPUTS, flat_params, param_changes
from mnist_lstm.tracking import registry, spool

DEFAULT_REF = f"models:/{registry.REGISTERED_MODEL}@{registry.CHAMPION}"
MODEL_FILE = Path("models/model.keras")
# What each recorded environment tag is called in a verdict.
ENVIRONMENT_NAMES = {
    "env.python": "Python",
    "env.tensorflow": "tensorflow",
    "env.keras": "keras",
    "env.numpy": "numpy",
    "env.platform": "platform",
    "env.cpu": "CPU",
}
# How long a stopped rebuild's processes get to end before they are killed.
STOP_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class Target:
    """The model to rebuild: its bytes' md5 and the run that trained it."""

    label: str
    md5: str
    run: dict[str, Any]
    recorded: dict[str, Any]

    @property
    def tags(self) -> dict[str, str]:
        return self.run["tags"]


@dataclasses.dataclass
class Rebuild:
    """What the worktree's `dvc repro train` made."""

    model_md5: str | None
    retrained: bool
    seconds: float
    failure: str = ""
    kernel: str | None = None
    data_md5: dict[str, str] = dataclasses.field(default_factory=dict)
    dependencies: dict[str, str] = dataclasses.field(default_factory=dict)


def target(ref: str, scratch: Path) -> Target:
    """The bytes `ref` names and the run behind them. A registered version's are downloaded and
    checked against the md5 recorded when it was registered (registry.download_checked); a run
    id's are its logged model's, downloaded and hashed."""
    if ref.startswith("models:/"):
        checked = registry.download_checked(ref, scratch)
        name = ref[len("models:/") :].split("/")[0].split("@")[0]
        exact = f"models:/{name}/{checked.version}" if checked.version else ref
        run_id = registry.resolve_run(exact)
        label, md5 = checked.label, checked.md5
    else:
        run_id = registry.resolve_run(ref)
        hashed = [m for m in registry.logged_models(run_id, scratch) if m.md5]
        if not hashed:
            raise UserError(f"run {run_id} logged no model that can be downloaded and hashed")
        label, md5 = f"run {run_id}", hashed[0].md5
    return Target(label, md5, registry.describe_run(run_id), registry.recorded_reproduction(run_id))


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def source_commit(root: Path, tags: dict[str, str]) -> tuple[str | None, str]:
    """(commit, what it is): the experiment's own commit when the run came from a `dvc exp`
    this repo holds (it has the params and any uncommitted code the experiment ran with), else
    the commit the run recorded; None when the repo does not hold it."""
    name, baseline = tags.get("dvc.dvc_exp_name"), tags.get("dvc.dvc_exp_baseline_rev", "")
    if name and len(baseline) == 40:
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
        found = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if found.returncode == 0:
            return found.stdout.strip(), f"experiment {name}'s commit"
    commit = tags.get("git.commit", "none")
    if commit != "none" and _git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0:
        return commit, "the run's commit"
    return None, ""


@contextlib.contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """A detached git worktree at `commit`, removed (and unregistered) however the block ends."""
    scratch = Path(tempfile.mkdtemp(prefix="mnist-lstm-reproduce-"))
    path = scratch / "worktree"
    try:
        added = _git(root, "worktree", "add", "--detach", "--quiet", str(path), commit)
        if added.returncode != 0:
            raise UserError(f"git worktree add {commit[:7]} failed: {one_line(added.stderr)}")
        yield path
    finally:
        _git(root, "worktree", "remove", "--force", str(path))
        shutil.rmtree(scratch, ignore_errors=True)
        _git(root, "worktree", "prune")


def _typed(text: str, like: Any) -> Any:
    """A logged param (MLflow keeps text: `5` of a float param reads `5.0`) as the type
    params.yaml holds it; as YAML reads it when it is not of that type."""
    if isinstance(like, str):
        return os.path.expanduser(text) if text.startswith("~") else text
    value = yaml.safe_load(text)
    if isinstance(like, bool) and text in ("True", "False"):
        return text == "True"
    if isinstance(like, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_params(path: Path, logged: dict[str, str]) -> list[str]:
    """Write the run's logged params over params.yaml at `path`; the ones that changed."""
    doc = yaml.safe_load(path.read_text()) or {}
    changes = param_changes(logged, flat_params(doc))
    for key, text in logged.items():
        section, _, name = key.partition(".")
        if isinstance(doc.get(section), dict) and name in doc[section]:
            doc[section][name] = _typed(text, doc[section][name])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return changes


def _stop_tree(process: subprocess.Popen) -> None:
    """End a rebuild and every process it started (DVC ends at once on SIGTERM and leaves its
    stage running), so the worktree can go."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def _dvc(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`dvc ARGS` in the worktree; stopped with everything it started if this process is."""
    command = [sys.executable, "-m", "dvc", *args]
    process = subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate()
    except BaseException:
        _stop_tree(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def dvc_settings(root: Path) -> tuple[Path, str]:
    """The workspace's DVC cache folder (the worktree takes from it and adds to it) and default
    remote ("" for none), from one `dvc config --list`."""
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--list", "--show-origin"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        raise UserError(f"dvc config --list failed in {root}: {one_line(listed.stderr)}")
    cache, remote = root / ".dvc" / "cache", ""
    for line in listed.stdout.splitlines():
        origin, _, setting = line.partition("\t")
        key, _, value = setting.partition("=")
        if key == "cache.dir":  # relative to the config file that sets it, as DVC reads it
            cache = (root / origin).parent / Path(value).expanduser()
        elif key == "core.remote":
            remote = value
    return cache.resolve(), remote


def prepare(root: Path, work: Path, cache: Path) -> dict[str, str]:
    """The worktree set up as the workspace's twin: its DVC config (remotes and their local
    credentials) and cache; the environment its stages run in (its own code, no store)."""
    local = root / ".dvc" / "config.local"
    if local.is_file():
        shutil.copyfile(local, work / ".dvc" / "config.local")
    config = configobj.ConfigObj(str(work / ".dvc" / "config.local"))
    config.setdefault("cache", {})["dir"] = str(cache)
    config.write()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "src"), env.get("PYTHONPATH")]))
    env[tracking.TRACKING_MODE_ENV] = "offline"
    return env


def _failure(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(("ERROR", "error:"))]
    return one_line(lines[-1] if lines else output.strip().splitlines()[-1] if output else "")


def rebuild(work: Path, env: dict[str, str], remote: str, say) -> Rebuild:
    """`dvc repro train` in the worktree: from the cache (the run-cache and, with a default
    remote, what `dvc fetch --run-cache` brings), training only what neither holds."""
    pull: tuple[str, ...] = ()
    if remote:
        fetched = _dvc(work, env, "fetch", "--run-cache")
        if fetched.returncode == 0:
            pull = ("--pull",)
        else:
            say(f"remote {remote!r}: not all fetched ({_failure(fetched.stdout)}); the cache only")
    started = time.perf_counter()
    ran = _dvc(work, env, "repro", *pull, "train")
    if ran.returncode != 0 and pull:
        ran = _dvc(work, env, "repro", "train")
    seconds = time.perf_counter() - started
    result = Rebuild(
        model_md5=md5_file(work / MODEL_FILE) if (work / MODEL_FILE).is_file() else None,
        retrained="Running stage 'train'" in ran.stdout,
        seconds=seconds,
        failure=""
        if ran.returncode == 0
        else f"dvc repro exit {ran.returncode}: " + _failure(ran.stdout),
    )
    for tag, (_, path) in LOCKED_OUTPUTS.items():
        if tag != tracking.TAG_MODEL_MD5 and (work / path).is_file():
            result.data_md5[tag] = md5_file(work / path)
    hashed = {work / LOCKED_OUTPUTS[tag][1]: md5 for tag, md5 in result.data_md5.items()}
    result.dependencies = tracking.train_dependencies(work / "dvc.yaml", hashed)
    for deferred in spool.pending(work):  # the retrain's own run, kept offline in the worktree
        tags = deferred.meta.get("create", {}).get("tags", {})
        result.kernel = tags.get(tracking.TAG_LSTM_KERNEL, result.kernel)
    return result


def differences(
    target: Target,
    commit: str | None,
    changed_params: list[str],
    made: Rebuild | None,
    here: dict[str, str],
) -> list[str]:
    """Every recorded input of the run that differs now, one line each."""
    tags, found = target.tags, []
    recorded_commit = tags.get("git.commit", "none")
    if commit is None:
        found.append(
            f"commit {recorded_commit[:12]}: not in this repository (`git fetch` it; an "
            "experiment's: `dvc exp pull <remote> <name>`)"
        )
    if changed_params:
        found.append(
            "params (the run's, over params.yaml at its commit): " + "; ".join(changed_params)
        )
    if made is not None:
        recorded_deps = target.recorded.get("train_dependencies", {})
        code = sorted(p for p, md5 in recorded_deps.items() if made.dependencies.get(p) != md5)
        if code:
            found.append(
                f"code: {', '.join(code)} differ from what the run trained with "
                f"(uncommitted changes when it trained: {tags.get('git.dirty', 'unknown')})"
            )
        for tag, md5 in made.data_md5.items():
            if tags.get(tag) and tags[tag] != md5:
                found.append(
                    f"data: {LOCKED_OUTPUTS[tag][1]} md5 {tags[tag]} when it trained is in no "
                    f"cache or remote here; rebuilt, it is {md5}"
                )
        kernel = tags.get(tracking.TAG_LSTM_KERNEL)
        if made.retrained and kernel and made.kernel and kernel != made.kernel:
            found.append(f"LSTM kernel: {kernel} when it trained, {made.kernel} here")
    for tag, name in ENVIRONMENT_NAMES.items():
        if tags.get(tag) and tags[tag] != here[tag]:
            found.append(f"{name}: {tags[tag]} when it trained, {here[tag]} here")
    hosts = tags.get("train.cluster_size", "1")
    if hosts != "1":
        found.append(f"hosts: it trained on {hosts} hosts; this rebuild trains on 1")
    return found


def verdict(target: Target, made: Rebuild | None, why: str, found: list[str]) -> tuple[str, int]:
    """The one verdict line (and the differences under it) and the exit status."""
    if made is not None and not made.failure and made.model_md5 == target.md5:
        how = f"retrained in {made.seconds:.0f} s" if made.retrained else "restored from the cache"
        return f"{target.label}: reproduced bit for bit ({how})", 0
    if not why:
        why = (
            made.failure
            if made.failure
            else f"the rebuilt model's md5 {made.model_md5} differs from the registered "
            f"bytes' {target.md5}"
        )
    lines = [f"{target.label}: not reproduced ({why}); recorded inputs that differ now:"]
    lines += [f"  - {line}" for line in found] or [
        "  - none: same commit, params, code, data and environment, other bytes "
        "(docs/tracking.md#reproduce-a-model)"
    ]
    return "\n".join(lines), 1


@exits_cleanly
@tracking.refusals()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "ref", nargs="?", default=DEFAULT_REF, help=f"run id or models:/… (default {DEFAULT_REF})"
    )
    args = parser.parse_args(argv)
    root = tracking.project_root()

    def say(line: str) -> None:
        print(f"reproduce: {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mnist-lstm-registered-") as scratch:
        wanted = target(args.ref, Path(scratch))
    here = tracking.environment_tags()
    commit, what = source_commit(root, wanted.tags)
    made, changed, why = None, [], ""
    if commit is None:
        why = f"commit {wanted.tags.get('git.commit', 'none')[:12]} is not in this repository"
    else:
        say(
            f"rebuilding {wanted.label}: run {wanted.run['run_id']}, md5 {wanted.md5}, at "
            f"{what} {commit[:7]}, in a temporary worktree"
        )
        with worktree(root, commit) as work:
            changed = apply_params(work / "params.yaml", wanted.run["params"])
            cache, remote = dvc_settings(root)
            made = rebuild(work, prepare(root, work, cache), remote, say)
    found = differences(wanted, commit, changed, made, here)
    line, status = verdict(wanted, made, why, found)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
