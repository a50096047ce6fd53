"""A champion no one can forge: promotion trusts a logged model's bytes, not the md5 tag any run
can copy, and `make serve` and the predict CLI refuse a registered version whose bytes are no
longer the ones hashed when it was registered.

The fast tests log tiny models into a sqlite store in-process; the slow ones run the real
`dvc repro`, `python -m mnist_lstm.promote`, `python -m mnist_lstm.serve` and the predict CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

from conftest import (
    REPO,
    commit,
    free_port,
    invoke,
    locked_model_md5,
    make_promotable_project,
    run,
)

CHAMPION = "models:/mnist-lstm@champion"
EXAMPLE = np.zeros((2, 28, 28), np.float32)


def tiny_model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((28, 28)), keras.layers.LSTM(4), keras.layers.Dense(10)])


def log_model_run(folder: Path, seed: int, tags: dict[str, str] | None = None):
    """A run holding a model logged the project's way (tracking.models.log_model), in the
    experiment of the store MLFLOW_TRACKING_URI names: (run id, model id, the model file's md5)."""
    import mlflow

    from mnist_lstm import tracking
    from mnist_lstm.keras_archive import save_model
    from mnist_lstm.tracking import models

    tracking.connect()
    model = tiny_model(seed)
    keras_file = folder / f"seed{seed}.keras"
    md5 = save_model(keras_file, model)
    with mlflow.start_run(tags=tags) as started:
        uri = models.log_model(model, keras_file, EXAMPLE, started.info.run_id)
    return started.info.run_id, uri.removeprefix("models:/"), md5


def stored_keras_file(model_id: str) -> Path:
    """Where the store keeps a logged model's Keras file (a local artifact store)."""
    import mlflow

    location = mlflow.MlflowClient().get_logged_model(model_id).artifact_location
    return Path(urllib.parse.urlparse(location).path) / "data" / "model.keras"


@contextlib.contextmanager
def replaced(path: Path, content: bytes):
    """`path` holds `content` inside the block (what a PUT through the artifact proxy does)."""
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store, artifacts beside it, for this module's in-process tests: version 1 of
    mnist-lstm registered the way `make promote` does, and another run's model.

    Yields the folder, (model id, md5) of the champion and (run id, model id, md5) of the other."""
    from mnist_lstm.tracking import registry

    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        run_id, model_id, md5 = log_model_run(folder, seed=0)
        other = log_model_run(folder, seed=1)
        assert registry.promote(run_id, model_id, md5, None) == "1"
        yield folder, (model_id, md5), other


def test_the_logged_model_holds_the_very_file_the_stage_wrote(store, tmp_path):
    from mnist_lstm.contracts import md5_file
    from mnist_lstm.tracking import registry

    _, _, (run_id, model_id, md5) = store
    (logged,) = registry.logged_models(run_id, tmp_path)
    assert (logged.model_id, logged.md5, logged.problem) == (model_id, md5, "")
    assert md5_file(stored_keras_file(model_id)) == md5


def test_a_registered_version_loads_while_its_bytes_have_the_recorded_md5(store, tmp_path):
    import mlflow

    from mnist_lstm.tracking import models, registry

    _, (_, md5), _ = store
    version = mlflow.MlflowClient().get_model_version("mnist-lstm", "1")
    assert version.tags[registry.TAG_VERSION_MD5] == md5
    checked = registry.download_checked(CHAMPION, tmp_path / "a")
    assert (checked.version, checked.md5, checked.label) == ("1", md5, f"{CHAMPION} (version 1)")
    # The copy checked is a private one, never the store's own folder.
    assert checked.folder.is_relative_to(tmp_path / "a")
    model = models.load_keras_file(checked.folder, checked.label)
    np.testing.assert_allclose(model(EXAMPLE), tiny_model(0)(EXAMPLE), atol=1e-6)
    assert registry.download_checked("models:/mnist-lstm/1", tmp_path / "b").version == "1"


def test_a_champion_whose_artifact_was_replaced_is_refused(store, tmp_path):
    from mnist_lstm.tracking import registry
    from mnist_lstm.tracking.models import UnverifiedModel

    _, (model_id, md5), (_, other_id, other_md5) = store
    refusal = (
        f"the model's bytes (md5 {other_md5}) differ from the md5 recorded when it was "
        f"registered ({md5}); refusing to load it"
    )
    with replaced(stored_keras_file(model_id), stored_keras_file(other_id).read_bytes()):
        with pytest.raises(UnverifiedModel) as alias:
            registry.download_checked(CHAMPION, tmp_path / "a")
        with pytest.raises(UnverifiedModel) as explicit:
            registry.download_checked("models:/mnist-lstm/1", tmp_path / "b")
    assert str(alias.value) == f"{CHAMPION} (version 1): {refusal}"
    assert str(explicit.value) == f"models:/mnist-lstm/1: {refusal}"


def test_the_predict_cli_refuses_a_replaced_champion_in_one_line(store, tmp_path, capsys):
    from mnist_lstm.predict import main

    _, (model_id, md5), (_, other_id, other_md5) = store
    image = tmp_path / "seven.png"
    canvas = np.zeros((40, 40), np.uint8)
    canvas[8:12, 8:30], canvas[12:32, 24:28] = 255, 255
    Image.fromarray(canvas).save(image)

    with replaced(stored_keras_file(model_id), stored_keras_file(other_id).read_bytes()):
        assert main([str(image)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: {CHAMPION} (version 1): the model's bytes (md5 {other_md5}) differ from the md5 "
        f"recorded when it was registered ({md5}); refusing to load it"
    ]
    # The genuine bytes back: the same command predicts.
    assert main([str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_an_mlmodel_that_loads_other_code_is_refused_though_the_bytes_match(store, tmp_path):
    from mnist_lstm.tracking import registry
    from mnist_lstm.tracking.models import UnverifiedModel

    _, (model_id, _), _ = store
    mlmodel = stored_keras_file(model_id).parent.parent / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    spec["flavors"]["python_function"]["code"] = "code"  # pyfunc would put it on sys.path
    with replaced(mlmodel, yaml.safe_dump(spec).encode()):
        with pytest.raises(UnverifiedModel, match="does not load data/model.keras through mlflow"):
            registry.download_checked(CHAMPION, tmp_path)


def test_a_logged_model_by_id_has_no_recorded_hash_but_is_downloaded_and_hashed(store, tmp_path):
    from mnist_lstm.tracking import registry

    _, _, (_, model_id, md5) = store
    checked = registry.download_checked(f"models:/{model_id}", tmp_path)
    assert (checked.version, checked.md5, checked.label) == (None, md5, f"models:/{model_id}")


def test_a_version_registered_without_a_hash_is_refused(store, tmp_path):
    import mlflow

    from mnist_lstm.tracking import registry
    from mnist_lstm.tracking.models import UnverifiedModel

    _, _, (_, model_id, _) = store
    # What older code registered: no md5 tag.
    version = mlflow.register_model(f"models:/{model_id}", "mnist-lstm").version
    uri = f"models:/mnist-lstm/{version}"
    with pytest.raises(UnverifiedModel, match=rf"^{uri}: registered without a recorded hash"):
        registry.download_checked(uri, tmp_path)


# The real pipeline, promotion and server (slow tier).


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = make_promotable_project(tmp_path_factory.mktemp("champion"))
    run(["dvc", "repro"], root, env)
    commit(root, env, "baseline run")
    return root, env


def py(root, env, module, *args, check=True, **kwargs):
    cmd = ["python", "-m", f"mnist_lstm.{module}", *args]
    if kwargs:
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, **kwargs)
    return run(cmd, root, env, check=check)


def project_registry(root: Path):
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def forged(project):
    """A newer run in the same experiment carrying the genuine model's md5 tag, with a model of
    other weights logged the project's own way: what anyone able to log a run can make."""
    root, _ = project
    client = project_registry(root)
    genuine = client.search_runs(
        [client.get_experiment_by_name("mnist-lstm").experiment_id],
        filter_string="tags.`dvc.model_md5` != ''",
    )
    assert len(genuine) == 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        scratch = Path(tempfile.mkdtemp())
        forged_id, _, forged_md5 = log_model_run(
            scratch, seed=7, tags={"dvc.model_md5": locked_model_md5(root)}
        )
    assert forged_md5 != locked_model_md5(root)
    return genuine[0].info.run_id, forged_id, forged_md5


@pytest.fixture(scope="module")
def promoted(project, forged):
    """`make promote` with the forged run the newest carrying the tag."""
    root, env = project
    return py(root, env, "promote")


@pytest.mark.e2e
@pytest.mark.slow
def test_promote_registers_the_genuine_run_and_names_the_forged_one(project, forged, promoted):
    root, _ = project
    genuine_id, forged_id, forged_md5 = forged
    assert (
        f"promote: run {forged_id} carries the model's md5 tag but its logged model's bytes "
        f"differ (md5 {forged_md5}); skipped"
    ) in promoted.stdout.splitlines()
    assert "promote: mnist-lstm version 1 " in promoted.stdout
    version = project_registry(root).get_model_version_by_alias("mnist-lstm", "champion")
    assert version.run_id == genuine_id and version.tags["source_run_id"] == genuine_id
    assert version.tags["model_md5"] == locked_model_md5(root)


@pytest.mark.e2e
@pytest.mark.slow
def test_with_only_forged_runs_promote_registers_nothing(project, forged, promoted):
    root, env = project
    genuine_id, forged_id, _ = forged
    client = project_registry(root)
    before = len(client.search_model_versions("name='mnist-lstm'"))
    client.delete_run(genuine_id)
    try:
        refused = py(root, env, "promote", check=False)
    finally:
        client.restore_run(genuine_id)
    assert refused.returncode == 1
    assert f"promote: run {forged_id} carries the model's md5 tag" in refused.stdout
    assert error_lines(refused) == [
        f"error: none of the 1 run(s) in sqlite:///{root / 'mlflow.db'} tagged with the md5 "
        f"dvc.lock records for the model ({locked_model_md5(root)}) logged a model with those "
        "bytes; nothing registered, @champion unchanged"
    ]
    assert len(client.search_model_versions("name='mnist-lstm'")) == before
    assert client.get_model_version_by_alias("mnist-lstm", "champion").run_id == genuine_id


def holdout_png(root: Path, folder: Path) -> Path:
    """The first holdout image as a picture a user would have: 112x112 PNG."""
    with np.load(root / "data" / "processed" / "mnist.npz") as data:
        x = data["x_holdout"][0]
    path = folder / "holdout0.png"
    Image.fromarray((x * 255).astype(np.uint8)).resize((112, 112)).save(path)
    return path


def answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
    except OSError:
        return False
    return True


@pytest.mark.e2e
@pytest.mark.slow
def test_the_genuine_champion_serves_and_predicts_then_stops_on_ctrl_c(project, promoted, tmp_path):
    import keras

    from mnist_lstm.predict import read_image, to_mnist

    root, env = project
    png = holdout_png(root, tmp_path)
    predicted = py(root, env, "predict", str(png))
    ours = keras.models.load_model(root / "models" / "model.keras")
    p = keras.ops.convert_to_numpy(
        keras.ops.softmax(ours(to_mnist(read_image(png))[None], training=False))
    )[0]
    assert predicted.stdout == f"{png}: {int(p.argmax())} (confidence {p.max():.3f})\n"

    port, scratch = free_port(), tmp_path / "tmp"
    scratch.mkdir()
    # As from a terminal: SIGINT not ignored (a shell's background job would pass it on ignored,
    # and Python then never turns it into KeyboardInterrupt); a handler is reset by exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve = subprocess.Popen(
            ["python", "-m", "mnist_lstm.serve", "--port", str(port)],
            cwd=root,
            env={**env, "TMPDIR": str(scratch)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 120
        while not answers(port):
            assert serve.poll() is None, serve.stdout.read()
            assert time.monotonic() < deadline, "the champion was not served within 2 minutes"
            time.sleep(0.5)
        with np.load(root / "data" / "processed" / "mnist.npz") as data:
            x = data["x_holdout"]
        logits = invoke(port, x)
        holdout = pd.read_csv(root / "reports" / "holdout_predictions.csv")
        np.testing.assert_array_equal(logits.argmax(axis=1), holdout["prediction"])
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in the terminal: its foreground group
        out, _ = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:  # the test failed: leave no server behind
            for process in psutil.Process(serve.pid).children(recursive=True):
                process.kill()
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert serve.returncode == 0, out
    assert f"serve: {CHAMPION} (version 1): its bytes have the md5 recorded" in out
    assert out.rstrip().endswith("serve: stopped") and "Traceback" not in out
    assert not answers(port)
    assert not list(scratch.glob("mnist-lstm-serve-*")), "the checked copy was left behind"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_replaced_champion_artifact_is_refused_by_serve_and_predict(
    project, forged, promoted, tmp_path
):
    root, env = project
    _, forged_id, forged_md5 = forged
    client = project_registry(root)
    version = client.get_model_version_by_alias("mnist-lstm", "champion")
    forged_model = client.search_logged_models(
        experiment_ids=[client.get_run(forged_id).info.experiment_id],
        filter_string=f"source_run_id = '{forged_id}'",
    )[0]
    champion_id = version.source.removeprefix("models:/")  # the logged model registered
    refusal = (
        f"error: {CHAMPION} (version {version.version}): the model's bytes "
        f"(md5 {forged_md5}) differ from the md5 recorded when it was registered "
        f"({locked_model_md5(root)}); refusing to load it"
    )
    png, port = holdout_png(root, tmp_path), free_port()
    forged_bytes = stored_keras_file(forged_model.model_id).read_bytes()
    with replaced(stored_keras_file(champion_id), forged_bytes):
        predicted = py(root, env, "predict", str(png), check=False)
        served = py(root, env, "serve", "--port", str(port), timeout=300)
        assert not answers(port)
    assert predicted.returncode == 1 and predicted.stdout == ""
    assert error_lines(predicted) == [refusal]
    assert served.returncode == 1 and "serve: starting" not in served.stdout
    assert error_lines(served) == [refusal]


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.e2e
@pytest.mark.slow
def test_make_lineage_of_the_champion_names_the_registered_run_not_the_newest_tagged_one(
    project, forged, promoted, tmp_path
):
    root, env = project
    genuine_id, forged_id, _ = forged
    version = project_registry(root).get_model_version_by_alias("mnist-lstm", "champion")
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    # `make lineage` as a user types it; -o install: the tiny project has no venv of its own.
    result = run(["make", "-o", "install", "lineage", f"REF={CHAMPION}"], root, env)
    assert "Traceback" not in result.stdout + result.stderr
    (run_line,) = lines_starting(result.stdout, "run ")
    assert run_line.split()[1] == version.run_id == genuine_id != forged_id
    assert lines_starting(result.stdout, "md5        models/model.keras: ") == [
        f"md5        models/model.keras: {version.tags['model_md5']}"
    ]
    assert lines_starting(result.stdout, "reproduces ")[0].startswith("reproduces yes")


@pytest.mark.e2e
@pytest.mark.slow
def test_predict_by_default_predicts_with_the_champion(project, forged, promoted, tmp_path):
    import mlflow

    from mnist_lstm.predict import read_image, to_mnist

    root, env = project
    _, forged_id, _ = forged
    client = project_registry(root)
    with np.load(root / "data" / "processed" / "mnist.npz") as data:
        holdout = data["x_holdout"]
    pngs = []
    for index, x in enumerate(holdout):
        pngs.append(tmp_path / f"holdout{index}.png")
        Image.fromarray((x * 255).astype(np.uint8)).resize((112, 112)).save(pngs[-1])
    forged_model = client.search_logged_models(
        experiment_ids=[client.get_run(forged_id).info.experiment_id],
        filter_string=f"source_run_id = '{forged_id}'",
    )[0]
    # The workspace now holds another model (an experiment's, say): predict must not use it.
    other = stored_keras_file(forged_model.model_id).read_bytes()
    with replaced(root / "models" / "model.keras", other):
        predicted = py(root, env, "predict", *map(str, pngs))  # no --model: the champion
    digits = [int(line.rsplit(": ", 1)[1].split()[0]) for line in predicted.stdout.splitlines()]

    images = np.stack([to_mnist(read_image(png)) for png in pngs])
    champion = mlflow.pyfunc.load_model(CHAMPION).predict(images).argmax(axis=1)
    newest = mlflow.pyfunc.load_model(f"models:/{forged_model.model_id}").predict(images)
    assert digits == champion.tolist()
    assert digits != newest.argmax(axis=1).tolist()  # the other model would answer otherwise
