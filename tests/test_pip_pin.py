"""pip stays in the project's environment, however it was made: MLflow records pip's version in
every logged model's conda.yaml (and warns "Failed to resolve installed pip version" without it).
uv installs exactly the lock -- in a venv uv made, that is no pip at all -- so pip is locked."""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import yaml

from conftest import REPO


def test_pip_is_a_locked_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.split(">")[0].split("=")[0] == "pip" for dep in project["dependencies"])
    locked = tomllib.loads((REPO / "uv.lock").read_text())["package"]
    assert [p["version"] for p in locked if p["name"] == "pip"]


def test_pip_runs_in_this_environment():
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pip {importlib.metadata.version('pip')} ")


def test_a_logged_model_pins_pip_in_its_conda_env(tmp_path, monkeypatch, caplog):
    import mlflow

    from test_champion import log_model_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with caplog.at_level(logging.WARNING):
        _, model_id, _ = log_model_run(tmp_path, seed=0)
    location = mlflow.MlflowClient().get_logged_model(model_id).artifact_location
    folder = Path(url2pathname(urlparse(location).path))  # file:///C:/... on Windows
    conda = yaml.safe_load((folder / "conda.yaml").read_text())
    pins = [dep for dep in conda["dependencies"] if isinstance(dep, str) and dep.startswith("pip")]
    # As MLflow writes it: no newer pip than the one the model was logged with.
    assert pins == [f"pip<={importlib.metadata.version('pip')}"]
    assert "Failed to resolve installed pip version" not in caplog.text
