"""Shared tracking: the pipeline against a real `mlflow server` on a real PostgreSQL cluster.

Started by `python -m mnist_lstm.server` (what `make server` runs) on free loopback ports; the test
reads everything back over the server's REST API and its artifact proxy, as a teammate would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import (
    BIN,
    free_port,
    http_service,
    invoke,
    locked_model_md5,
    make_promotable_project,
    run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def have_postgres() -> bool:
    from mnist_lstm.errors import UserError
    from mnist_lstm.server.postgres import postgres_bin

    try:
        postgres_bin()
    except UserError:
        return False
    return True


# CI installs PostgreSQL (.ci/run): there a missing server is a failure, not a skip.
needs_postgres = pytest.mark.skipif(
    not have_postgres() and not os.environ.get("CI"),
    reason="PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)",
)


@pytest.fixture(scope="module")
def server():
    # Not under pytest's tmp folder: that is private to root, and PostgreSQL runs as `postgres`.
    parent = Path(tempfile.mkdtemp(prefix="mnist-lstm-server-"))
    parent.chmod(0o755)
    state = parent / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    cmd = [str(BIN / "python"), "-m", "mnist_lstm.server"]
    started = run(
        [
            *cmd,
            "start",
            "--state",
            str(state),
            "--port",
            str(free_port()),
            "--pg-port",
            str(free_port()),
        ],
        state.parent,
        env,
    )
    uri = (state / "uri").read_text().strip()
    assert f"MLflow tracking server: {uri}" in started.stdout
    # On loopback it stays one person's server: no login, plain HTTP, and it says so.
    assert uri.startswith("http://127.0.0.1:") and "no authentication" in started.stdout
    try:
        yield uri, state
    finally:
        stopped = run([*cmd, "stop", "--state", str(state)], state.parent, env)
        shutil.rmtree(parent, ignore_errors=True)
        assert "stopped: mlflow server, PostgreSQL" in stopped.stdout


def rest(uri: str, endpoint: str, body: dict | None = None, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def promoted(server, tmp_path_factory):
    """The pipeline run against the server, then promoted there: what a teammate does."""
    uri, _ = server
    root, env = make_promotable_project(tmp_path_factory.mktemp("project"))
    env["MLFLOW_TRACKING_URI"] = uri
    run(["dvc", "repro"], root, env)
    promoted = run(["python", "-m", "mnist_lstm.promote"], root, env)
    return root, env, promoted


@needs_postgres
def test_pipeline_logs_to_the_shared_server_and_promotes_in_its_registry(server, promoted):
    uri, state = server
    root, env, promotion = promoted
    # Nothing went to a local store: the run is on the server, in PostgreSQL.
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    experiment = rest(uri, "experiments/get-by-name", experiment_name="mnist-lstm")["experiment"]
    (found,) = rest(uri, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
    params = {p["key"]: p["value"] for p in found["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
    assert tags["dvc.model_md5"] == locked_model_md5(root)
    assert params["train.epochs"] == "10" and params["train.units"] == "16"
    local = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["eval/val_accuracy"] == pytest.approx(local["val_accuracy"])
    assert found["info"]["status"] == "FINISHED"

    # The model went through the server's artifact proxy into its artifacts folder, and loads.
    import mlflow

    mlflow.set_tracking_uri(uri)
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[experiment["experiment_id"]], output_format="list"
    )
    assert logged.source_run_id == found["info"]["run_id"]
    assert any(path.name == "model.keras" for path in (state / "artifacts").rglob("*"))
    served = mlflow.keras.load_model(f"models:/{logged.model_id}")
    import keras

    ours = keras.models.load_model(root / "models" / "model.keras")
    with np.load(root / "data" / "processed" / "mnist.npz") as data:
        x = data["x_holdout"]
    np.testing.assert_allclose(served.predict(x, verbose=0), ours.predict(x, verbose=0), atol=1e-6)

    # Promotion used the server's registry.
    assert "is now @champion" in promotion.stdout
    alias = rest(uri, "registered-models/alias", name="mnist-lstm", alias="champion")
    assert alias["model_version"]["version"] == "1"
    assert alias["model_version"]["run_id"] == found["info"]["run_id"]


@needs_postgres
def test_make_serve_answers_with_the_champions_digits_for_real_holdout_images(server, promoted):
    uri, _ = server
    root, env, _ = promoted
    port = free_port()
    # The command `make serve` runs, against the shared registry: the champion downloaded,
    # its bytes checked against the md5 recorded at promotion, then served.
    serve = ["python", "-m", "mnist_lstm.serve", "--port", str(port)]
    with http_service(serve, root, env, f"http://127.0.0.1:{port}/ping"):
        with np.load(root / "data" / "processed" / "mnist.npz") as data:
            x, labels = data["x_holdout"], data["y_holdout"]
        logits = invoke(port, x)
    assert logits.shape == (len(labels), 10)
    holdout = pd.read_csv(root / "reports" / "holdout_predictions.csv")
    # The served champion answers what evaluate predicted, and that is the right digit.
    np.testing.assert_array_equal(logits.argmax(axis=1), holdout["prediction"])
    np.testing.assert_array_equal(logits.argmax(axis=1), labels)


@needs_postgres
def test_mlflow_logs_into_postgresql_as_a_role_that_owns_its_databases_and_nothing_else(server):
    from mnist_lstm.server import postgres

    uri, state = server
    port = json.loads((state / "server.json").read_text())["pg_port"]
    role = postgres.psql(
        state,
        port,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = 'mlflow';"
        "SELECT datname FROM pg_database WHERE datdba = 'mlflow'::regrole ORDER BY 1;"
        "SELECT count(*) FROM pg_roles WHERE rolsuper AND rolname <> current_user;",
        "query",
    ).split()
    assert role == ["f|f|f|f|f", "mlflow", "mlflow_auth", "0"]
    password = (state / "secrets" / "pg-password").read_text().strip()
    env = {**os.environ, "PGPASSWORD": password}
    psql = [str(postgres.postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", str(port)]
    psql += ["-U", "mlflow", "-tAc", "SELECT 1"]
    assert subprocess.run([*psql, "-d", "mlflow"], env=env, capture_output=True).returncode == 0
    refused = subprocess.run([*psql, "-d", "postgres"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "permission denied" in refused.stderr
    # Its password exists only in a file of the owner's, never on a command line or in the log.
    assert oct((state / "secrets" / "pg-password").stat().st_mode & 0o777) == "0o600"
    assert password not in (state / "mlflow.log").read_text()
    assert password not in (state / "postgres.log").read_text()


def test_without_postgresql_the_server_says_how_to_install_it(monkeypatch):
    from mnist_lstm.errors import UserError
    from mnist_lstm.server import postgres

    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install postgresql"):
        postgres.postgres_bin()


def test_a_taken_port_is_refused_before_starting_anything(tmp_path):
    import functools
    import http.server
    import threading

    from mnist_lstm import server
    from mnist_lstm.errors import UserError

    (tmp_path / "health").write_text("ok")  # anything answering 200 on /health
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    busy = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="something already answers on http://127.0.0.1:"):
            server.start_mlflow(
                tmp_path,
                server.postgres.Databases("postgresql://unused", "postgresql://unused"),
                "127.0.0.1",
                busy.server_port,
                "x",
                5,
            )
        assert not (tmp_path / "mlflow.pid").exists()
    finally:
        busy.shutdown()


@needs_postgres
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="as root only (postgres refuses root)"
)
def test_make_server_as_root_from_a_private_folder_names_the_state_variable(tmp_path):
    from conftest import REPO

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "server", f"STATE={private / 'state'}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "cannot reach this folder" in line and "`make server STATE=<dir>`" in line
    assert "Traceback" not in result.stderr
