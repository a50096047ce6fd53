"""Where a model came from.

`python -m mnist_lstm.lineage [RUN_ID | models:/NAME/VERSION | models:/NAME@ALIAS]`

With no argument it explains the current workspace: the run that trained the model file
`dvc.lock` records. It prints the git commit, the params that differ from `params.yaml` at HEAD,
the data and model digests, the metrics, and whether the workspace reproduces that run right now
(`dvc.lock` records the same hashes and `dvc status` reports nothing to rerun).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mnist_lstm import tracking
from mnist_lstm.errors import UserError, exits_cleanly
from mnist_lstm.tracking import outage, registry

# The DVC outputs whose hashes tie a run to dvc.lock, by lineage tag.
LOCKED_OUTPUTS = {
    tracking.TAG_RAW_MD5: ("fetch", "data/raw/mnist.npz"),
    tracking.TAG_PROCESSED_MD5: ("normalize", "data/processed/mnist.npz"),
    tracking.TAG_MODEL_MD5: ("train", "models/model.keras"),
}


def locked_hashes(lock: dict[str, Any]) -> dict[str, str]:
    """{lineage tag: md5} for the outputs dvc.lock records."""
    hashes = {}
    for tag, (stage, path) in LOCKED_OUTPUTS.items():
        for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
            if out.get("path") == path and "md5" in out:
                hashes[tag] = out["md5"]
    return hashes


def flat_params(doc: dict[str, Any]) -> dict[str, str]:
    """`{"train.units": "64"}`, stringified the way MLflow stores params."""
    flat = {}
    for section, values in (doc or {}).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = (
                    str(float(value)) if isinstance(value, float) else str(value)
                )
    return flat


def param_changes(logged: dict[str, str], defaults: dict[str, str]) -> list[str]:
    """Human-readable `key: default -> logged` for every param the run set differently."""
    changes = []
    for key in sorted(logged):
        if key not in defaults:
            changes.append(f"{key}: (not in params.yaml) -> {logged[key]}")
        elif _same(logged[key], defaults[key]) is False:
            changes.append(f"{key}: {defaults[key]} -> {logged[key]}")
    return changes


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def reproduction_verdict(
    run_hashes: dict[str, str], workspace_hashes: dict[str, str], dvc_clean: bool | None
) -> str:
    differing = [tag for tag, md5 in run_hashes.items() if workspace_hashes.get(tag) != md5]
    if differing:
        names = ", ".join(LOCKED_OUTPUTS[tag][1] for tag in differing)
        return f"no: dvc.lock records other bytes for {names}"
    if dvc_clean is None:
        return "unknown: `dvc status` could not run"
    if not dvc_clean:
        return "no: `dvc status` reports changed stages (run `dvc repro`)"
    return "yes: dvc.lock records the same data and model hashes and `dvc status` is clean"


def _git(root: Path, *args: str) -> str | None:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def _dvc_status_clean(root: Path) -> bool | None:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True
    )
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout or "{}") == {}
    except json.JSONDecodeError:
        return None


def _read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def workspace_runs(root: Path, max_results: int = 1) -> tuple[str, list[str]]:
    """The md5 dvc.lock records for the model file and the runs (newest first) tagged with it:
    the tag says which run trained it, though anyone who can log a run can copy it."""
    model_md5 = locked_hashes(_read_lock(root)).get(tracking.TAG_MODEL_MD5)
    if model_md5 is None:
        raise UserError(f"{root / 'dvc.lock'}: records no trained model yet; run `dvc repro` first")
    tracking.connect()
    found = tracking.find_runs_by_model(model_md5, max_results)
    if not found:
        raise UserError(
            f"no run in {tracking.tracking_uri()} trained the model dvc.lock records "
            f"(md5 {model_md5}); the store may be another clone's"
        )
    return model_md5, found


def workspace_run_id(root: Path) -> str:
    """The newest run that trained the model file dvc.lock records for this workspace."""
    return workspace_runs(root)[1][0]


def report(
    run: dict[str, Any],
    defaults: dict[str, str],
    workspace_hashes: dict[str, str],
    dvc_clean: bool | None,
) -> list[str]:
    tags = run["tags"]
    started = datetime.datetime.fromtimestamp(run["start_time_ms"] / 1000, tz=datetime.timezone.utc)
    commit, dirty = tags.get("git.commit", "unknown"), tags.get("git.dirty", "unknown")
    lines = [
        f"run        {run['run_id']}  {run['name']}  "
        f"({run['status']}, started {started:%Y-%m-%d %H:%M:%S} UTC)",
        f"commit     {commit}  (uncommitted changes: {dirty})",
    ]
    if tags.get("dvc.dvc_exp_name"):
        baseline = tags.get("dvc.dvc_exp_baseline_rev", "?")
        lines.append(f"experiment {tags['dvc.dvc_exp_name']}  (baseline {baseline})")
    changes = param_changes(run["params"], defaults)
    lines.append("params     " + ("; ".join(changes) if changes else "as in params.yaml at HEAD"))
    source, raw_sha = (
        tags.get("data.fetch_source", "unknown"),
        tags.get("data.raw_sha256", "unknown"),
    )
    lines.append(f"data       fetched from {source}, raw sha256 {raw_sha}")
    for tag, (_, path) in LOCKED_OUTPUTS.items():
        lines.append(f"md5        {path}: {tags.get(tag, 'unknown')}")
    metrics = {
        k: v for k, v in sorted(run["metrics"].items()) if k.startswith(tracking.EVAL_PREFIX)
    }
    shown = metrics or dict(sorted(run["metrics"].items()))
    lines.append(
        "metrics    " + (", ".join(f"{k} {v:.6g}" for k, v in shown.items()) or "none logged")
    )
    run_hashes = {tag: tags[tag] for tag in LOCKED_OUTPUTS if tag in tags}
    lines.append("reproduces " + reproduction_verdict(run_hashes, workspace_hashes, dvc_clean))
    return lines


@exits_cleanly
@tracking.refusals()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", help="run id, models:/NAME/VERSION or models:/NAME@ALIAS")
    args = parser.parse_args(argv)

    root = tracking.project_root()
    # Runs an outage (or offline mode) left in the spool are not in the store yet: say so first.
    for line in outage.waiting():
        print(f"not synced {line}")
    workspace_hashes = locked_hashes(_read_lock(root))
    run_id = registry.resolve_run(args.ref) if args.ref else workspace_run_id(root)
    committed = _git(root, "show", "HEAD:params.yaml")
    defaults_doc = (
        yaml.safe_load(committed)
        if committed
        else yaml.safe_load((root / "params.yaml").read_text())
    )
    lines = report(
        registry.describe_run(run_id),
        flat_params(defaults_doc),
        workspace_hashes,
        _dvc_status_clean(root),
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
