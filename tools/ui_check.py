"""`make ui-check`: what a user sees in the MLflow UI, checked in a real browser.

Runs the pipeline's stages on tiny generated data into a fresh store, starts `make ui` on it, and
has headless Chromium (Debian's `chromium`, driven by playwright-core: tools/ui-check/check.mjs)
open the links the pipeline prints. Asserts the experiment page lists the training runs with
their datasets and the run page draws the per-epoch charts and, in its "System metrics" tab, the
CPU and memory series train and evaluate sampled; screenshots go to reports/ui/.
Exit 0 when every check passed, 1 (one line per failed check) otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tools" / "ui-check" / "check.mjs"
EPOCHS = 3
RUNS = (("lstm16", {"units": 16}), ("lstm32", {"units": 32}))
# A tiny training lasts seconds: a sample a second draws each system metric as a line.
SAMPLE_EVERY_S = 1
SYSTEM_METRICS_CHECK = REPO / "tools" / "ui-check" / "system_metrics.mjs"


def tiny_mnist(path: Path, seed: int = 0) -> None:
    """MNIST's layout (uint8 28x28, labels 0-9), learnable: digit d lights row band d."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 3, :] = 255
        return images, labels

    (x_train, y_train), (x_test, y_test) = split(200), split(50)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def stage(module: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", f"mnist_lstm.{module}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"ui-check: stage {module} failed: {tail}")
    return result.stdout


def link(text: str, prefix: str) -> str:
    """The UI link (from `#/`) on the line starting with `prefix`."""
    for line in text.splitlines():
        if line.startswith(prefix) and "#/" in line:
            return "#/" + line.split("#/", 1)[1].split()[0]
    raise SystemExit(f"ui-check: no line starting with {prefix!r} printed a UI link")


def make_store(work: Path) -> tuple[str, str]:
    """Two tiny trainings, each evaluated, in a sqlite store under `work`: its path, and the run
    link evaluate printed for the first."""
    tiny_mnist(work / "tiny.npz")
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        MNIST_LSTM_TRACKING="online",
    )
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["fetch"].update(source="path", path=str(work / "tiny.npz"))
    base["train"].update(epochs=EPOCHS, batch_size=32, optimizer="adam", learning_rate=0.02)
    base["system_metrics"].update(interval_s=SAMPLE_EVERY_S)
    data = ["--data", "data/processed/mnist.npz"]
    links = []
    for name, overrides in RUNS:
        params = yaml.safe_load(yaml.safe_dump(base))
        params["train"].update(overrides)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        raw = ["--out", "data/raw/mnist.npz", "--provenance", "data/raw/provenance.json"]
        stage("fetch", "--params", "params.yaml", *raw, cwd=work, env=env)
        norm = ["--raw", "data/raw/mnist.npz", "--out", "data/processed/mnist.npz"]
        stage("normalize", "--params", "params.yaml", *norm, cwd=work, env=env)
        model = ["--model", "models/model.keras", "--history", "models/history.csv"]
        stage("train", "--params", "params.yaml", *data, *model, cwd=work, env=env)
        reports = work / "reports"
        printed = stage(
            "evaluate", *data, *model,
            "--provenance", "data/raw/provenance.json",
            "--metrics", f"{reports}/metrics.json", "--per-class", f"{reports}/per_class.csv",
            "--confusion", f"{reports}/confusion.csv", "--holdout", f"{reports}/holdout.csv",
            "--val-predictions", f"{reports}/val.csv",
            "--confusion-png", f"{reports}/confusion.png", "--curves-png", f"{reports}/curves.png",
            cwd=work, env=env,
        )  # fmt: skip
        links.append(link(printed, "evaluate: logged to"))
    return str(work / "mlflow.db"), links[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def make_ui(store: str, port: int, log: Path):
    """`make ui` on the store, as a user starts it; stopped with its children afterwards."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "ui", f"STORE={store}", f"UI_PORT={port}"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise SystemExit(f"ui-check: `make ui` exited ({process.returncode}); see {log}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"ui-check: `make ui` did not answer within 2 minutes; see {log}")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def experiment_and_runs(store: str) -> list[tuple[str, str]]:
    """(run id, run name) of each training run, oldest first, from the store itself."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("mnist-lstm")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [(r.info.run_id, r.info.run_name) for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "ui")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    args = parser.parse_args(argv)

    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(
            f"ui-check: no {args.chromium!r} on PATH; install Debian's chromium "
            "(apt-get install chromium) or set CHROMIUM=<path>",
            file=sys.stderr,
        )
        return 1
    if not (CHECK.parent / "node_modules" / "playwright-core").is_dir():
        print("ui-check: playwright-core is not installed; run `make ui-check`", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-check-") as tmp:
        work = Path(tmp)
        print("ui-check: training two tiny runs into a fresh store", flush=True)
        store, run_link = make_store(work)
        runs = experiment_and_runs(store)
        port = free_port()
        with make_ui(store, port, args.out / "make-ui.log"):
            experiment_link = link((args.out / "make-ui.log").read_text(), "MLflow UI:")
            result = subprocess.run(
                [
                    "node", str(CHECK),
                    "--chromium", chromium,
                    "--base", f"http://127.0.0.1:{port}",
                    "--experiment-link", experiment_link,
                    "--run-link", run_link,
                    "--runs", ",".join(f"{run_id}={name}" for run_id, name in runs),
                    "--epochs", str(EPOCHS),
                    "--out", str(args.out),
                ],
                cwd=REPO,
            )  # fmt: skip
            # Run from its folder, where node finds playwright-core.
            system = subprocess.run(
                ["node", str(SYSTEM_METRICS_CHECK)],
                cwd=CHECK.parent,
                env=dict(
                    os.environ,
                    UI_CHECK_CHROMIUM=chromium,
                    UI_CHECK_RUN_URL=f"http://127.0.0.1:{port}/{run_link}",
                    UI_CHECK_OUT=str(args.out),
                ),
            )
    if system.returncode:
        print("ui-check: the System metrics check failed; screenshots in " + str(args.out))
    return result.returncode or system.returncode


if __name__ == "__main__":
    sys.exit(main())
