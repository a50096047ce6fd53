"""Promotion: `python -m mnist_lstm.promote` registers the workspace model if it passes the gate.

The model registered is a logged one whose bytes are the workspace's model file: among the runs
tagged with the md5 dvc.lock records for it (newest first), the first whose logged model, downloaded
from the artifact store and hashed, has that md5. A run whose tag matches but whose bytes do not
is named and skipped; with none left, nothing is registered (exit status 1).

The baseline is the current `champion` of the registered model `mnist-lstm`, with its metrics as
logged in MLflow (with no champion yet, only the absolute limits apply). When every rule holds,
that model becomes a new version, `champion` moves to it, and the version is tagged with the
verified md5, the previous champion's version and the git commit. When a rule fails, nothing is
registered and `champion` stays; exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from mnist_lstm import gate, tracking
from mnist_lstm.errors import UserError, exits_cleanly, one_line
from mnist_lstm.lineage import workspace_runs
from mnist_lstm.params import load_params
from mnist_lstm.tracking import registry

# Runs tagged with the workspace model's md5 that are checked, newest first (each downloads one
# small model); the same model is rarely trained more than a few times.
MAX_CANDIDATES = 100


def _why_skipped(logged: list[registry.HashedModel]) -> str:
    if not logged:
        return "it has no finished logged model"
    problems = [one_line(m.problem, limit=120) for m in logged if m.md5 is None]
    hashes = [m.md5 for m in logged if m.md5 is not None]
    said = [f"its logged model's bytes differ (md5 {', '.join(hashes)})"] if hashes else []
    return "; ".join(said + problems)


def verified_source(model_md5: str, run_ids: list[str]) -> tuple[str, str]:
    """(run id, logged model id) of the newest run whose logged model's bytes have `model_md5`;
    each run whose tag matches but whose bytes do not is named in one line and skipped."""
    with tempfile.TemporaryDirectory(prefix="mnist-lstm-promote-") as scratch:
        for run_id in run_ids:
            logged = registry.logged_models(run_id, Path(scratch))
            for model in logged:
                if model.md5 == model_md5:
                    return run_id, model.model_id
            print(
                f"promote: run {run_id} carries the model's md5 tag but {_why_skipped(logged)}; "
                "skipped"
            )
    raise UserError(
        f"none of the {len(run_ids)} run(s) in {tracking.tracking_uri()} tagged with the md5 "
        f"dvc.lock records for the model ({model_md5}) logged a model with those bytes; "
        f"nothing registered, @{registry.CHAMPION} unchanged"
    )


@exits_cleanly
@tracking.refusals()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--report", type=Path, default=Path("reports/promote.md"))
    args = parser.parse_args(argv)

    (rules,) = load_params(args.params, "gate")
    current = gate.read_metrics(args.metrics)
    model_md5, candidates = workspace_runs(tracking.project_root(), MAX_CANDIDATES)
    run_id, model_id = verified_source(model_md5, candidates)
    print(
        f"promote: run {run_id}'s logged model {model_id} has the bytes dvc.lock records "
        f"(md5 {model_md5})"
    )
    logged = registry.logged_metrics(run_id)
    stale = [
        k
        for k in rules.rules
        if k in logged and not math.isclose(logged[k], current.get(k, math.nan), abs_tol=1e-6)
    ]
    if stale:
        raise gate.GateError(
            f"{args.metrics}: {', '.join(stale)} differ from what run {run_id} logged; "
            "run `dvc repro`"
        )

    previous = registry.champion()
    label = f"champion v{previous['version']}" if previous else "no champion yet"
    checks = gate.check_metrics(
        current, previous["metrics"] if previous else None, rules.rules, str(args.metrics), label
    )
    lines = gate.render(checks, label)
    gate.write_report(args.report, f"Promotion of run {run_id} vs {label}", lines)
    print("\n".join(lines))
    if not gate.passed(checks):
        print(
            f"promote: nothing registered; {registry.CHAMPION} stays at "
            f"{'version ' + previous['version'] if previous else 'no version'}"
        )
        return gate.EXIT_FAILED
    version = registry.promote(
        run_id, model_id, model_md5, previous["version"] if previous else None
    )
    print(
        f"promote: {registry.REGISTERED_MODEL} version {version} (run {run_id}) is now "
        f"@{registry.CHAMPION}" + (f", was version {previous['version']}" if previous else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
