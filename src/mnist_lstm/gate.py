"""The regression gate: `python -m mnist_lstm.gate [--baseline REV]` fails a build that got worse.

Compares the workspace metrics (written by `evaluate`) with the metrics file committed at REV
(default: `main`, or `origin/main`, when HEAD is elsewhere; else HEAD) under the rules
in params.yaml `gate`: per metric, which way is better, an absolute limit and the largest allowed
regression against the baseline. Prints a markdown table, writes it to the report file, and exits
0 (all rules hold), 1 (a rule failed: the last line names it) or 2 (a file or metric is missing).

Not a DVC stage on purpose: a worse experiment is still a valid experiment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mnist_lstm import contracts
from mnist_lstm.errors import UserError, exits_cleanly, one_line
from mnist_lstm.params import GateRule, load_params

EXIT_FAILED = 1
# Metrics are written rounded to 6 decimals; this keeps "no change" from failing on float noise.
_TOLERANCE = 1e-9


class GateError(UserError):
    """The gate cannot judge: a metrics file, a baseline or a metric is missing."""

    exit_code = 2


@dataclass(frozen=True)
class Check:
    metric: str
    baseline: float | None
    current: float
    rule: str
    passed: bool | None  # None: not applicable (no baseline to regress from)
    failure: str = ""


def _worse_by(rule: GateRule, current: float, reference: float) -> float:
    """How far `current` is on the bad side of `reference` (negative: on the good side)."""
    return reference - current if rule.better == "higher" else current - reference


def check_metrics(
    current: Mapping[str, float],
    baseline: Mapping[str, float] | None,
    rules: Mapping[str, GateRule],
    current_source: str = "current metrics",
    baseline_source: str = "baseline",
) -> list[Check]:
    """Every rule applied to every metric it names; missing metrics are a GateError."""
    checks = []
    for metric, rule in rules.items():
        if metric not in current:
            raise GateError(
                f"{current_source}: metric '{metric}' missing (the gate has rules for it)"
            )
        if baseline is not None and metric not in baseline:
            raise GateError(
                f"{baseline_source}: metric '{metric}' missing (the gate has rules for it)"
            )
        value = float(current[metric])
        base = float(baseline[metric]) if baseline is not None else None
        if rule.limit is not None:
            sign = ">=" if rule.better == "higher" else "<="
            ok = _worse_by(rule, value, rule.limit) <= _TOLERANCE
            side = "below the floor" if rule.better == "higher" else "above the ceiling"
            checks.append(
                Check(
                    metric,
                    base,
                    value,
                    f"{sign} {rule.limit:g}",
                    ok,
                    "" if ok else f"{metric} {value:g} is {side} {rule.limit:g}",
                )
            )
        if rule.max_regression is not None:
            verb = "drop" if rule.better == "higher" else "rise"
            label = f"{verb} <= {rule.max_regression:g}"
            if base is None:
                checks.append(Check(metric, None, value, label, None))
                continue
            worse = _worse_by(rule, value, base)
            ok = worse <= rule.max_regression + _TOLERANCE
            verb_past = "dropped" if rule.better == "higher" else "rose"
            checks.append(
                Check(
                    metric,
                    base,
                    value,
                    label,
                    ok,
                    ""
                    if ok
                    else f"{metric} {verb_past} {worse:.6g} against {baseline_source}, "
                    f"more than the allowed {rule.max_regression:g}",
                )
            )
    return checks


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def render(checks: list[Check], baseline_label: str) -> list[str]:
    """The markdown table and the verdict line (last)."""
    lines = [
        f"| metric | baseline ({baseline_label}) | current | change | rule | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        change = "—" if check.baseline is None else f"{check.current - check.baseline:+.6g}"
        verdict = {True: "pass", False: "**FAIL**", None: "skipped (no baseline)"}[check.passed]
        lines.append(
            f"| {check.metric} | {_fmt(check.baseline)} | {_fmt(check.current)} | {change} "
            f"| {check.rule} | {verdict} |"
        )
    failures = [check.failure for check in checks if check.passed is False]
    judged = sum(check.passed is not None for check in checks)
    lines.append("")
    if failures:
        lines.append("gate: FAILED: " + "; ".join(failures))
    else:
        lines.append(f"gate: passed: {judged} rule(s) hold against {baseline_label}")
    return lines


def passed(checks: list[Check]) -> bool:
    return all(check.passed is not False for check in checks)


def read_metrics(path: Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise GateError(f"{path}: metrics file not found; run `dvc repro` first")
    try:
        metrics = contracts.read_json(path)
    except contracts.ContractError as err:
        raise GateError(str(err)) from None
    if not isinstance(metrics, dict):
        raise GateError(f"{path}: must hold a JSON object of metrics")
    return metrics


def default_baseline(root: Path) -> str:
    """`main` (or `origin/main`, as in a CI checkout of a pull request) when HEAD is elsewhere."""

    def rev(name: str) -> str | None:
        result = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip() if result.returncode == 0 else None

    head = rev("HEAD")
    for name in ("main", "origin/main"):
        main_rev = rev(name)
        if main_rev:
            return name if head and main_rev != head else "HEAD"
    return "HEAD"


def committed_metrics(root: Path, rev: str, path: Path) -> dict[str, float]:
    """The metrics file as committed at `rev`."""
    relative = (
        Path(path).resolve().relative_to(root.resolve()) if Path(path).is_absolute() else Path(path)
    )
    result = subprocess.run(
        ["git", "show", f"{rev}:{relative.as_posix()}"], cwd=root, capture_output=True, text=True
    )
    if result.returncode != 0:
        why = one_line(result.stderr, last=True, default="git failed")
        raise GateError(f"baseline {rev}:{relative.as_posix()}: not committed there ({why})")
    try:
        metrics = json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise GateError(
            f"baseline {rev}:{relative.as_posix()}: not valid JSON ({one_line(err)})"
        ) from None
    if not isinstance(metrics, dict):
        raise GateError(f"baseline {rev}:{relative.as_posix()}: must hold a JSON object of metrics")
    return metrics


def write_report(path: Path, title: str, lines: list[str]) -> None:
    with contracts.atomic_path(path) as tmp:
        tmp.write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision holding the baseline metrics file")
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--report", type=Path, default=Path("reports/gate.md"))
    args = parser.parse_args(argv)

    (gate,) = load_params(args.params, "gate")
    root = Path.cwd()
    baseline_rev = args.baseline or default_baseline(root)
    current = read_metrics(args.metrics)
    baseline = committed_metrics(root, baseline_rev, args.metrics)
    checks = check_metrics(current, baseline, gate.rules, str(args.metrics), baseline_rev)
    lines = render(checks, baseline_rev)
    write_report(args.report, f"Metrics gate: workspace vs {baseline_rev}", lines)
    print("\n".join(lines))
    return 0 if passed(checks) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
