from __future__ import annotations

import pytest

from mnist_lstm import contracts, tracking
from mnist_lstm.normalize import split
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
