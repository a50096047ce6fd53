from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mnist_lstm import gate
from mnist_lstm.params import GateRule, ParamsError, load_params

RULES = {
    "val_accuracy": GateRule(better="higher", limit=0.93, max_regression=0.01),
    "val_loss": GateRule(better="lower", limit=0.25, max_regression=0.05),
}
BASELINE = {"val_accuracy": 0.969, "val_loss": 0.094, "holdout_accuracy": 1.0}


def verdicts(checks):
    return [(c.metric, c.rule, c.passed) for c in checks]


def test_unchanged_metrics_pass():
    checks = gate.check_metrics(BASELINE, BASELINE, RULES)
    assert gate.passed(checks)
    assert gate.render(checks, "HEAD")[-1] == "gate: passed: 4 rule(s) hold against HEAD"


def test_improved_metrics_pass_and_show_the_gain():
    better = dict(BASELINE, val_accuracy=0.975, val_loss=0.08)
    checks = gate.check_metrics(better, BASELINE, RULES)
    assert gate.passed(checks)
    table = "\n".join(gate.render(checks, "HEAD"))
    assert "| val_accuracy | 0.969 | 0.975 | +0.006 | drop <= 0.01 | pass |" in table


def test_below_the_floor_fails_naming_metric_and_rule():
    worse = dict(BASELINE, val_accuracy=0.925)  # a drop of 0.044 as well
    checks = gate.check_metrics(worse, dict(BASELINE, val_accuracy=0.93), RULES)
    assert not gate.passed(checks)
    assert ("val_accuracy", ">= 0.93", False) in verdicts(checks)
    assert (
        gate.render(checks, "HEAD")[-1]
        == "gate: FAILED: val_accuracy 0.925 is below the floor 0.93"
    )


def test_a_drop_larger_than_allowed_fails_even_above_the_floor():
    checks = gate.check_metrics(
        dict(BASELINE, val_accuracy=0.955), BASELINE, RULES, baseline_source="main"
    )
    assert ("val_accuracy", ">= 0.93", True) in verdicts(checks)
    assert ("val_accuracy", "drop <= 0.01", False) in verdicts(checks)
    assert gate.render(checks, "main")[-1] == (
        "gate: FAILED: val_accuracy dropped 0.014 against main, more than the allowed 0.01"
    )


def test_lower_is_better_metrics_fail_when_they_rise():
    checks = gate.check_metrics(dict(BASELINE, val_loss=0.16), BASELINE, RULES)
    assert ("val_loss", "rise <= 0.05", False) in verdicts(checks)
    assert ("val_loss", "<= 0.25", True) in verdicts(checks)


def test_a_drop_exactly_at_the_allowance_passes():
    checks = gate.check_metrics(dict(BASELINE, val_accuracy=0.959), BASELINE, RULES)
    assert gate.passed(checks)


def test_without_baseline_only_limits_are_judged():
    checks = gate.check_metrics(BASELINE, None, RULES)
    assert [c.passed for c in checks] == [True, None, True, None]
    assert gate.passed(checks)


def test_a_metric_missing_on_either_side_is_an_error_not_a_pass():
    with pytest.raises(gate.GateError, match="current: metric 'val_loss' missing"):
        gate.check_metrics({"val_accuracy": 0.97}, BASELINE, RULES, current_source="current")
    with pytest.raises(gate.GateError, match="HEAD: metric 'val_loss' missing"):
        gate.check_metrics(BASELINE, {"val_accuracy": 0.97}, RULES, baseline_source="HEAD")
    assert gate.GateError.exit_code == 2


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            {"better": "up", "limit": 1, "max_regression": 0},
            "gate.val_accuracy.better must be one of higher, lower",
        ),
        (
            {"better": "higher", "limit": None, "max_regression": None},
            "gate.val_accuracy needs a limit, a max_regression or both",
        ),
        (
            {"better": "higher", "limit": 0.9, "max_regression": -0.1},
            "gate.val_accuracy.max_regression must be a finite number or null >= 0",
        ),
        (
            {"better": "higher", "limit": "0.9", "max_regression": 0.1},
            "gate.val_accuracy.limit must be a finite number or null, got '0.9'",
        ),
        ({"better": "higher", "limit": 0.9}, "missing key 'gate.val_accuracy.max_regression'"),
    ],
)
def test_gate_rules_are_validated_like_every_params_section(write_params, rule, expected):
    path = write_params()
    doc = path.read_text() + "\n"
    import yaml

    data = yaml.safe_load(doc)
    data["gate"] = {"val_accuracy": rule}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError) as err:
        load_params(path, "gate")
    assert expected in str(err.value)


# --- the command, in a real git repository ---


@pytest.fixture
def repo(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    git("init", "-q", "-b", "main")
    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    (tmp_path / "params.yaml").write_text(repo_params.read_text())
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(BASELINE))
    git("add", "-A")
    git("commit", "-qm", "baseline")
    monkeypatch.chdir(tmp_path)
    return tmp_path, git


def write_current(root: Path, **changes) -> None:
    (root / "reports" / "metrics.json").write_text(json.dumps(dict(BASELINE, **changes)))


def test_gate_command_passes_on_unchanged_metrics(repo, capsys):
    root, _ = repo
    assert gate.main([]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "gate: passed: 4 rule(s) hold against HEAD"
    assert (
        (root / "reports" / "gate.md").read_text().startswith("# Metrics gate: workspace vs HEAD")
    )


def test_gate_command_fails_with_a_table_and_the_rule_in_the_last_line(repo, capsys):
    root, _ = repo
    write_current(root, val_accuracy=0.84)
    assert gate.main([]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| metric | baseline (HEAD) | current | change | rule | verdict |")
    assert "| val_accuracy | 0.969 | 0.84 | -0.129 | drop <= 0.01 | **FAIL** |" in out
    assert out[-1] == (
        "gate: FAILED: val_accuracy 0.84 is below the floor 0.93; val_accuracy "
        "dropped 0.129 against HEAD, more than the allowed 0.01"
    )
    assert out[-1] in (root / "reports" / "gate.md").read_text()


def test_gate_defaults_to_main_on_another_branch(repo, capsys):
    root, git = repo
    git("checkout", "-q", "-b", "feature")
    write_current(root, val_accuracy=0.975)
    git("commit", "-qam", "better")
    write_current(root, val_accuracy=0.962)  # 0.013 below the branch, 0.007 below main
    assert gate.main([]) == 0
    assert "against main" in capsys.readouterr().out
    assert gate.main(["--baseline", "HEAD"]) == 1


def test_missing_metrics_file_or_baseline_exit_2(repo, capsys):
    root, git = repo
    assert gate.main(["--baseline", "no-such-rev"]) == 2
    assert (
        "error: baseline no-such-rev:reports/metrics.json: not committed there"
        in capsys.readouterr().err
    )
    (root / "reports" / "metrics.json").unlink()
    assert gate.main([]) == 2
    assert (
        "reports/metrics.json: metrics file not found; run `dvc repro` first"
        in capsys.readouterr().err
    )
