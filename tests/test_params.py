from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mnist_lstm.params import (
    FetchParams,
    NormalizeParams,
    ParamsError,
    SystemMetricsParams,
    flatten,
    load_params,
)
from mnist_lstm.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_reproduce_the_tutorial():
    fetch, normalize, train = load_params(REPO / "params.yaml", "fetch", "normalize", "train")
    assert isinstance(fetch, FetchParams) and fetch.source == "auto"
    assert normalize == NormalizeParams(holdout_size=10)
    assert (train.units, train.batch_norm, train.optimizer) == (64, True, "sgd")
    assert (train.learning_rate, train.batch_size, train.epochs) == (0.01, 64, 10)


def test_system_metrics_are_sampled_every_5_s_and_no_stage_depends_on_the_interval():
    (monitoring,) = load_params(REPO / "params.yaml", "system_metrics")
    assert monitoring == SystemMetricsParams(interval_s=5)
    assert flatten(monitoring) == {"system_metrics.interval_s": 5.0}
    # It changes no model and no report: DVC must never rerun a stage (or move dvc.lock) for it.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate"):
        assert "system_metrics" not in stages[name].get("params", []), name
        assert "src/mnist_lstm/tracking/system_metrics.py" in stages[name]["deps"], name


def test_params_are_frozen():
    (train,) = load_params(REPO / "params.yaml", "train")
    with pytest.raises(AttributeError):
        train.units = 128  # type: ignore[misc]


def test_flatten_names_keys_as_in_params_yaml():
    _, train = load_params(REPO / "params.yaml", "normalize", "train")
    flat = flatten(train)
    assert flat["train.units"] == 64 and flat["train.optimizer"] == "sgd"
    assert all(key.startswith("train.") for key in flat)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"train.units": "64"},
            "train.units must be an integer > 0, got '64' (a string: write 64)",
        ),
        ({"train.units": True}, "train.units must be an integer > 0, got true (a boolean)"),
        ({"train.units": 0}, "train.units must be an integer > 0, got 0"),
        ({"train.batch_size": -1}, "train.batch_size must be an integer > 0, got -1"),
        ({"train.epochs": 0}, "train.epochs must be an integer >= 1, got 0"),
        ({"train.epochs": 2.5}, "train.epochs must be an integer >= 1, got 2.5"),
        (
            {"train.learning_rate": "1e-3"},
            "train.learning_rate must be a finite number > 0, got '1e-3' (a string: write 0.001)",
        ),
        ({"train.learning_rate": 0.0}, "train.learning_rate must be a finite number > 0, got 0.0"),
        ({"train.learning_rate": math.inf}, "train.learning_rate must be a finite number > 0"),
        ({"train.learning_rate": math.nan}, "train.learning_rate must be a finite number > 0"),
        ({"train.batch_norm": "yes"}, "train.batch_norm must be true or false, got 'yes'"),
        (
            {"train.optimizer": "adamw"},
            "train.optimizer must be one of sgd, adam, rmsprop, got 'adamw'",
        ),
        ({"train.seed": -1}, "train.seed must be an integer 0..2**32-1, got -1"),
        ({"normalize.holdout_size": 0}, "normalize.holdout_size must be an integer 1..9999, got 0"),
        ({"normalize.holdout_size": 10000}, "normalize.holdout_size must be an integer 1..9999"),
        (
            {"fetch.source": "s3"},
            "fetch.source must be one of auto, keras, package, path, got 's3'",
        ),
        ({"fetch.source": "path"}, "fetch.path must name a local .npz when fetch.source is 'path'"),
        ({"fetch.url": "ftp://x"}, "fetch.url must be an http(s) URL, got 'ftp://x'"),
        ({"fetch.timeout_s": 0}, "fetch.timeout_s must be a finite number > 0, got 0"),
        ({"train.dropout": 1.0}, "train.dropout must be a finite number in [0, 1), got 1.0"),
        ({"train.layers": 0}, "train.layers must be an integer 1..4, got 0"),
        (
            {"train.schedule": "linear"},
            "train.schedule must be one of constant, cosine, got 'linear'",
        ),
        (
            {"train.readout": "attention"},
            "train.readout must be one of last, pool, got 'attention'",
        ),
        ({"train.augment_shift": 9}, "train.augment_shift must be an integer 0..8, got 9"),
        ({"train.tuning_split": -5}, "train.tuning_split must be an integer >= 0, got -5"),
        ({"train.bidirectional": 1}, "train.bidirectional must be true or false, got 1"),
        (
            {"system_metrics.interval_s": -1},
            "system_metrics.interval_s must be a finite number of seconds >= 0 (0: off), got -1",
        ),
        (
            {"system_metrics.interval_s": "5s"},
            "system_metrics.interval_s must be a finite number of seconds >= 0 (0: off), got '5s'",
        ),
    ],
)
def test_bad_values_name_file_key_value_and_rule(write_params, overrides, expected):
    path = write_params(overrides)
    with pytest.raises(ParamsError) as err:
        load_params(path, "fetch", "normalize", "train", "system_metrics")
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_unknown_key_suggests_the_intended_one(write_params, tmp_path):
    path = write_params({"train.epoch": 3})
    with pytest.raises(
        ParamsError, match=r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"
    ):
        load_params(path, "train")


def test_missing_key(write_params):
    path = write_params()
    path.write_text(path.read_text().replace("  seed: 0\n", ""))
    with pytest.raises(ParamsError, match="missing key 'train.seed'"):
        load_params(path, "train")


def test_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("fetch: {}\n")
    with pytest.raises(ParamsError, match=f"{path}: missing section 'train'"):
        load_params(path, "train")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: [units: 64\n", "not valid YAML at line"),
        (
            "- 1\n- 2\n",
            "must be a mapping with sections fetch, normalize, train, gate, system_metrics, "
            "got [1, 2]",
        ),
        ("", "must be a mapping with sections"),
        ("train: 5\n", "section 'train' must be a mapping of keys, got 5"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path, "train")
    assert expected in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml", "train")


def test_a_stage_stops_before_any_work_with_one_line(write_params, tmp_path, capsys):
    path = write_params({"train.learning_rate": "1e-3"})
    model = tmp_path / "model.keras"
    status = train_main(
        [
            "--params",
            str(path),
            "--data",
            str(tmp_path / "absent.npz"),
            "--model",
            str(model),
            "--history",
            str(tmp_path / "h.csv"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert err.strip().splitlines() == [
        f"error: {path}: train.learning_rate must be a finite number > 0, "
        "got '1e-3' (a string: write 0.001)"
    ]
    assert not model.exists()
