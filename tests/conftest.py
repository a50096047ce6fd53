"""Tiny fake MNIST made on the spot: tests never download anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def make_tiny_raw(n_train: int = 120, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Raw arrays in Keras' layout; digit d is a bright band on rows 2d..2d+2, so it is learnable."""
    rng = np.random.default_rng(seed)

    def images(labels: np.ndarray) -> np.ndarray:
        x = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            x[i, 2 * label : 2 * label + 3, 4:24] = 255
        return x

    y_train = np.arange(n_train, dtype=np.uint8) % 10
    y_test = np.arange(n_test, dtype=np.uint8) % 10
    return {
        "x_train": images(y_train),
        "y_train": y_train,
        "x_test": images(y_test),
        "y_test": y_test,
    }


@pytest.fixture
def tiny_raw() -> dict[str, np.ndarray]:
    return make_tiny_raw()


@pytest.fixture
def tiny_npz(tmp_path: Path, tiny_raw) -> Path:
    path = tmp_path / "tiny_mnist.npz"
    np.savez(path, **tiny_raw)
    return path


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a params.yaml: the repo's defaults with `overrides` ({"train.epochs": 1}) applied."""

    def write(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        params = default_params()
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".")
            params[section][key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return write
