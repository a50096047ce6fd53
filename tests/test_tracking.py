from __future__ import annotations

import subprocess

import pytest

from conftest import REPO
from mnist_lstm import contracts, tracking
from mnist_lstm.errors import UserError
from mnist_lstm.normalize import split
from mnist_lstm.tracking import store
from mnist_lstm.train import main as train_main


def test_project_root_sees_through_dvc_queue_temp_copies(tmp_path):
    repo = tmp_path / "repo"
    inside = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    inside.mkdir(parents=True)
    assert tracking.project_root(inside) == repo
    assert tracking.project_root(repo) == repo


def test_default_store_is_the_repos_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5005")
    assert tracking.tracking_uri() == "http://127.0.0.1:5005"


def test_printed_links_point_at_the_port_make_ui_serves_on(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(store.EXPERIMENT)
    run_id = client.create_run(experiment_id).info.run_id
    run_path = f"/#/experiments/{experiment_id}/runs/{run_id}?{store.TRAINING_VIEW}"
    monkeypatch.delenv(store.UI_PORT_ENV, raising=False)
    assert store.run_url(run_id) == f"http://127.0.0.1:5000{run_path}"
    monkeypatch.setenv(store.UI_PORT_ENV, "5005")
    assert store.run_url(run_id) == f"http://127.0.0.1:5005{run_path}"
    assert store.experiment_url().startswith(
        f"http://127.0.0.1:5005/#/experiments/{experiment_id}/"
    )
    # A tracking server's links are its own UI, whatever the local port.
    assert store.ui_base("https://mlflow.example:8443/") == "https://mlflow.example:8443"
    monkeypatch.setenv(store.UI_PORT_ENV, "http")
    with pytest.raises(UserError, match=store.UI_PORT_ENV):
        store.run_url(run_id)


@pytest.mark.parametrize("given", [["UI_PORT=5005"], []])
def test_make_hands_its_ui_port_to_the_links_runs_print(given, monkeypatch):
    monkeypatch.setenv(store.UI_PORT_ENV, "5010")
    show = "show: ; @echo $$" + store.UI_PORT_ENV
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", show, "show", *given],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == ("5005" if given else "5010")


@pytest.mark.parametrize(
    "uri", ["nonsense-scheme://nowhere", "sqlite:////proc/no-such-dir/mlflow.db"]
)
def test_unusable_store_fails_before_training_with_the_uri(
    uri, tiny_raw, tmp_path, write_params, monkeypatch, capsys
):
    data = tmp_path / "processed.npz"
    contracts.save_processed(data, split(tiny_raw, 10))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = tmp_path / "model.keras"
    status = train_main(
        [
            "--params",
            str(write_params({"train.epochs": 50})),
            "--data",
            str(data),
            "--model",
            str(model),
            "--history",
            str(tmp_path / "history.csv"),
        ]
    )
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith(f"error: MLflow tracking URI {uri}: cannot be used")
    assert not model.exists()
    assert "Epoch 1/" not in captured.out  # refused before the first of 50 epochs
