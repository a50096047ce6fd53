"""Promotion: `python -m mnist_lstm.promote` registers the workspace model if it passes the gate.

The baseline is the current `champion` of the registered model `mnist-lstm`, with its metrics as
logged in MLflow (with no champion yet, only the absolute limits apply). When every rule holds,
the model of the run that produced the workspace's model file (found through dvc.lock) becomes a
new version, `champion` moves to it, and the version is tagged with the previous champion's version
and the git commit. When a rule fails, nothing is registered and `champion` stays; exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mnist_lstm import gate, tracking
from mnist_lstm.errors import exits_cleanly
from mnist_lstm.lineage import workspace_run_id
from mnist_lstm.params import load_params
from mnist_lstm.tracking import registry


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--report", type=Path, default=Path("reports/promote.md"))
    args = parser.parse_args(argv)

    (rules,) = load_params(args.params, "gate")
    current = gate.read_metrics(args.metrics)
    run_id = workspace_run_id(tracking.project_root())
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
    version = registry.promote(run_id, previous["version"] if previous else None)
    print(
        f"promote: {registry.REGISTERED_MODEL} version {version} (run {run_id}) is now "
        f"@{registry.CHAMPION}" + (f", was version {previous['version']}" if previous else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
