"""Reproducible, cached reruns, proven with the real `dvc` CLI on tiny data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO, edited, make_project, run, stages_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = make_project(tmp_path_factory.mktemp("cached"))
    run(["dvc", "repro"], root, env)
    return root, env


def assert_clean(root: Path, env: dict[str, str]) -> None:
    status = run(["dvc", "status"], root, env).stdout
    assert "Data and pipelines are up to date" in status, status


def test_forced_reruns_leave_dvc_lock_and_metrics_byte_identical(project):
    root, env = project
    run(["dvc", "repro", "-f"], root, env)
    lock, metrics = (
        (root / "dvc.lock").read_bytes(),
        (root / "reports" / "metrics.json").read_bytes(),
    )
    forced = run(["dvc", "repro", "-f"], root, env)
    assert stages_run(forced) == ["fetch", "normalize", "train", "evaluate"]
    assert (root / "dvc.lock").read_bytes() == lock
    assert (root / "reports" / "metrics.json").read_bytes() == metrics
    assert_clean(root, env)


def test_changing_a_train_param_reruns_train_and_evaluate_only(project):
    root, env = project
    with edited(root / "params.yaml", "epochs: 1", "epochs: 2"):
        assert stages_run(run(["dvc", "repro"], root, env)) == ["train", "evaluate"]
        assert_clean(root, env)
    # Back to the committed value: DVC's run-cache restores the earlier outputs, training nothing.
    assert stages_run(run(["dvc", "repro"], root, env)) == []
    assert_clean(root, env)


def test_changing_a_normalize_param_reruns_normalize_onward(project):
    root, env = project
    with edited(root / "params.yaml", "holdout_size: 10", "holdout_size: 12"):
        assert stages_run(run(["dvc", "repro"], root, env)) == ["normalize", "train", "evaluate"]
    assert stages_run(run(["dvc", "repro"], root, env)) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("timeout_s: 10", "timeout_s: 30"),
        ("tensorflow/tf-keras-datasets/mnist.npz", "tensorflow/tf-keras-datasets/mirror.npz"),
    ],
)
def test_changing_a_download_setting_reruns_fetch_and_no_training(project, old, new):
    """fetch.timeout_s and fetch.url change how bytes are fetched, not which: fetch reruns, writes
    the same bytes, and DVC has nothing downstream to rerun."""
    root, env = project
    with edited(root / "params.yaml", old, new):
        assert stages_run(run(["dvc", "repro"], root, env)) == ["fetch"]
        assert_clean(root, env)
    assert stages_run(run(["dvc", "repro"], root, env)) == []


def test_fetch_never_refetches_while_its_output_is_cached(project):
    root, env = project
    raw = root / "data" / "raw" / "mnist.npz"
    before = raw.read_bytes()
    raw.unlink()
    (root / "fixtures" / "tiny_mnist.npz").rename(root / "fixtures" / "gone.npz")  # no source left
    try:
        result = run(["dvc", "repro"], root, env)
    finally:
        (root / "fixtures" / "gone.npz").rename(root / "fixtures" / "tiny_mnist.npz")
    assert stages_run(result) == []
    assert raw.read_bytes() == before
    assert_clean(root, env)


def test_editing_a_module_reruns_the_stages_that_import_it_and_a_readme_none(project):
    root, env = project
    with edited(
        root / "src" / "mnist_lstm" / "model.py", '"""The tutorial', '"""(edited) The tutorial'
    ):
        # A docstring edit retrains, and the retrained model is byte-identical: DVC then has no
        # reason to rerun evaluate.
        assert stages_run(run(["dvc", "repro"], root, env)) == ["train"]
    assert stages_run(run(["dvc", "repro"], root, env)) == []
    with edited(root / "README.md", "# mnist-lstm", "# mnist-lstm (edited)"):
        assert stages_run(run(["dvc", "repro"], root, env)) == []


PACKAGE = REPO / "src" / "mnist_lstm"


def _source(name: str) -> Path | None:
    """The file of mnist_lstm module `name` ("tracking.store"), None if it names no module."""
    path = PACKAGE.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(module: Path) -> set[str]:
    """The mnist_lstm modules `module` imports directly, with the packages they sit in (whose
    `__init__` runs first)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_lstm"):
            base = node.module[len("mnist_lstm.") :] if node.module != "mnist_lstm" else ""
            if base:
                names.add(base)
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                if _source(name):
                    names.add(name)
        elif isinstance(node, ast.Import):
            names.update(
                a.name.split(".", 1)[1] for a in node.names if a.name.startswith("mnist_lstm.")
            )
    # `a.b` runs `a` (its __init__) first.
    return names | {name.rsplit(".", 1)[0] for name in names if "." in name}


@pytest.mark.parametrize("stage", ["fetch", "normalize", "train", "evaluate"])
def test_each_stage_declares_every_module_it_runs(stage):
    """dvc.yaml lists the stage's module and everything it imports, transitively, and no more."""
    needed, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_imports(_source(name)))
    needed.add("__init__")  # runs first on every `python -m mnist_lstm.<stage>`
    # A module that compiles a C++ source (csrc/<module>.cc) runs that code too.
    sources = {_source(name).relative_to(REPO).as_posix() for name in needed} | {
        f"src/mnist_lstm/csrc/{name}.cc"
        for name in needed
        if (PACKAGE / "csrc" / f"{name}.cc").exists()
    }
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    assert {d for d in deps if d.startswith("src/mnist_lstm/")} == sources
