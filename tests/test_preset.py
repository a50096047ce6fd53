from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import commit, make_project, run
from mnist_lstm.params import ParamsError, load_params, read_yaml
from mnist_lstm.preset import main, overrides

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_tuned_preset_is_valid_and_becomes_dvc_overrides(capsys):
    assert main([str(REPO / "params.tuned.yaml"), "--params", str(REPO / "params.yaml")]) == 0
    args = capsys.readouterr().out.split()
    assert args[0::2] == ["-S"] * (len(args) // 2)
    assert "train.bidirectional=true" in args


def test_a_preset_applied_over_params_yields_a_valid_configuration(tmp_path):
    base = read_yaml(REPO / "params.yaml")
    args = overrides({"train": {"units": 128, "schedule": "cosine"}}, base, "p.yaml")
    assert args == ["-S", "train.units=128", "-S", 'train.schedule="cosine"']
    for flag in args[1::2]:  # what dvc exp run -S would write back into params.yaml
        key, value = flag.split("=", 1)
        section, name = key.split(".")
        base[section][name] = yaml.safe_load(value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    (train,) = load_params(path, "train")
    assert train.units == 128 and train.schedule == "cosine"


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ({"train": {"units": 0}}, "p.yaml: train.units must be an integer > 0, got 0"),
        (
            {"train": {"epoch": 3}},
            "p.yaml: unknown key 'train.epoch' (did you mean 'train.epochs'?)",
        ),
        ({"trian": {"units": 3}}, "p.yaml: 'trian' is not a params.yaml section mapping"),
    ],
)
def test_a_bad_preset_is_refused_with_the_key(preset, expected):
    with pytest.raises(ParamsError) as err:
        overrides(preset, read_yaml(REPO / "params.yaml"), "p.yaml")
    assert str(err.value).startswith(expected)


@pytest.mark.e2e
@pytest.mark.slow
def test_make_tuned_runs_again_as_a_new_experiment(tmp_path):
    """The second `make tuned` on a commit is a second experiment, not DVC's duplicate-name
    refusal (a small preset on tiny data; `-o install`: the project's venv is the one in use)."""
    root, env = make_project(tmp_path)
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    (root / "params.tuned.yaml").write_text(yaml.safe_dump({"train": {"units": 8}}))
    commit(root, env, "make tuned")
    tuned = ["make", "--no-print-directory", "-o", "install", "tuned"]
    run(tuned, root, env)
    time.sleep(1)  # names are stamped to the second
    run(tuned, root, env)
    names = run(["dvc", "exp", "list", "--name-only"], root, env).stdout.split()
    assert len(names) == 2 and all(name.startswith("tuned-") for name in names), names
    run([*tuned, "TUNED_NAME=mine"], root, env)
    assert "mine" in run(["dvc", "exp", "list", "--name-only"], root, env).stdout.split()
