"""`make bench`: the tutorial script, our train stage and a plain PyTorch peer, side by side.

Rounds interleave the contenders (tutorial, train stage, PyTorch, tutorial, ...) so that the
machine's drift hits all alike. Per contender: per-epoch seconds after a warm-up epoch, whole
process seconds and peak resident memory; then `dvc repro -f` against the bare stage commands, a
no-op `dvc repro`, the 10-image holdout prediction (the tutorial's loop vs one batched call), and
what system metrics cost: `dvc repro -f -s train` sampling every `system_metrics.interval_s` (the
committed value) against the same with sampling off, interleaved, in a scratch copy of the project.
Prints a table (median, min, max; ratios to the tutorial and to PyTorch) and writes it as JSON.

Every contender trains on the same files from `data/`; runs go to a throwaway MLflow store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import memory_split  # bench/: this script's own folder is on sys.path
import yaml

REPO = Path(__file__).resolve().parents[1]
TORCH_PYTHON = REPO / "bench" / ".venv-torch" / "bin" / "python"
STAGES = ["fetch", "normalize", "train", "evaluate"]


def timed(cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one process, measured by GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        started = time.perf_counter()
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        peak_kib = int(report.read().strip().splitlines()[-1])
    return wall, peak_kib / 1024, result.stdout


def timed_with_memory(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS MiB, peak private MiB, stdout) of one process. Peak RSS is the
    kernel's (wait4's ru_maxrss, as GNU time reports it); it counts the pages of TensorFlow's
    shared libraries the process maps, and how many of those are resident depends on the page
    cache's state (docs/performance.md#memory). Private memory -- its anonymous pages: heap,
    tensors, Python objects -- is what the process itself allocates, sampled every 20 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
        for k, f in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    private = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        sample = memory_split.status(process.pid)
        if sample:
            private = max(private, sample["RssAnon"])
        time.sleep(0.02)
    wall = time.perf_counter() - started
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{out['stdout']}\n{out['stderr']}")
    return wall, usage.ru_maxrss / 1024, private, out["stdout"]


def last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def train_stage_epochs(store: str) -> list[float]:
    """The newest run's per-epoch seconds, as the train stage logged them."""
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("mnist-lstm")
    (run,) = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    history = sorted(
        client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step
    )
    return [m.value for m in history], run.data.metrics.get("val_accuracy")


def stage_commands() -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [stages[name]["cmd"] for name in STAGES]


def system_metrics_overhead(
    rounds: int, epochs: int, env: dict[str, str], scratch: Path
) -> dict[str, object]:
    """`dvc repro -f -s train` with system metrics sampled every `system_metrics.interval_s` (as
    params.yaml commits it) and with sampling off (0), interleaved, in a scratch copy of the
    project (this repository's outputs and dvc.lock stay as they are): seconds, and their ratio."""
    project = scratch / "system-metrics"
    for name in ("dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data" / "processed").mkdir(parents=True)
    shutil.copy2(REPO / "data/processed/mnist.npz", project / "data/processed/mnist.npz")
    env = dict(env, PYTHONPATH=str(project / "src"))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@mnist-lstm.invalid"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = epochs
    interval = params["system_metrics"]["interval_s"]
    if not interval:
        raise SystemExit("bench: params.yaml samples no system metrics (interval_s: 0)")
    dvc = str(Path(sys.executable).parent / "dvc")
    seconds: dict[float, list[float]] = {interval: [], 0: []}
    # Untimed: the first run in the copy hashes the data and compiles the code for the others.
    params["system_metrics"]["interval_s"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    timed([dvc, "repro", "-f", "-s", "train"], env, cwd=project)
    for round_no in range(rounds):
        for sampled in (interval, 0):
            params["system_metrics"]["interval_s"] = sampled
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            wall = timed([dvc, "repro", "-f", "-s", "train"], env, cwd=project)[0]
            seconds[sampled].append(wall)
            print(
                f"round {round_no + 1}/{rounds} `dvc repro -f -s train`, system metrics every "
                f"{sampled:g} s: {wall:.1f}s",
                flush=True,
            )
    sampling, off = summary(seconds[interval]), summary(seconds[0])
    return {
        "interval_s": interval,
        "epochs": epochs,
        "sampled_s": sampling,
        "off_s": off,
        "ratio": sampling["median"] / off["median"] if sampling and off else None,
    }


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    threads = {
        k: os.environ[k]
        for k in (
            "OMP_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS",
            "TF_ENABLE_ONEDNN_OPTS",
        )
        if k in os.environ
    }
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "thread_env": threads or "defaults (TensorFlow and PyTorch pick their own)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="per process, the first is warm-up")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument(
        "--training-only",
        action="store_true",
        help="skip the dvc and holdout figures (quick lever comparisons)",
    )
    parser.add_argument(
        "--system-metrics-only",
        action="store_true",
        help="only what system metrics cost `dvc repro -f -s train` (--rounds, --epochs)",
    )
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    store = f"sqlite:///{scratch / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, TF_CPP_MIN_LOG_LEVEL="2")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = args.epochs
    # The train stage with each LSTM kernel, side by side: what the fused oneDNN op gains.
    kernel_params = {}
    for kernel in ("onednn", "keras"):
        params["train"]["lstm_kernel"] = kernel
        kernel_params[kernel] = scratch / f"params-{kernel}.yaml"
        kernel_params[kernel].write_text(yaml.safe_dump(params, sort_keys=False))
    raw, processed = REPO / "data/raw/mnist.npz", REPO / "data/processed/mnist.npz"
    if not (raw.exists() and processed.exists()):
        raise SystemExit("bench: run `make run` first (it writes data/)")
    if args.system_metrics_only:
        overhead = system_metrics_overhead(args.rounds, args.epochs, env, scratch)
        lines = render_system_metrics(overhead)
        print("\n".join(lines))
        args.out.write_text(
            json.dumps({"machine": machine(), "system_metrics_overhead": overhead}, indent=2) + "\n"
        )
        print(f"bench: wrote {args.out}")
        return 0

    def train_stage(params_file: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mnist_lstm.train",
            "--params",
            str(params_file),
            "--data",
            str(processed),
            "--model",
            str(scratch / "model.keras"),
            "--history",
            str(scratch / "history.csv"),
        ]

    contenders = {
        "tutorial script": [
            sys.executable,
            "bench/tutorial_keras.py",
            "--data",
            str(raw),
            "--epochs",
            str(args.epochs),
        ],
        "train stage, fused oneDNN op": train_stage(kernel_params["onednn"]),
        "train stage, Keras' LSTM loop": train_stage(kernel_params["keras"]),
        "pytorch": [
            str(TORCH_PYTHON),
            "bench/torch_lstm.py",
            "--data",
            str(raw),
            "--epochs",
            str(args.epochs),
        ],
    }
    # The fused op is optional: where it cannot be built the bench says why and measures the rest.
    op = subprocess.run(
        [sys.executable, "-m", "mnist_lstm.onednn_build", "--require"],
        capture_output=True,
        text=True,
    )
    if op.returncode != 0:
        print(f"bench: no fused-op row ({op.stderr.strip().splitlines()[-1]})", flush=True)
        del contenders["train stage, fused oneDNN op"]
    figures: dict[str, dict[str, list[float]]] = {
        name: {
            "epoch_s": [],
            "process_s": [],
            "peak_mib": [],
            "private_peak_mib": [],
            "val_accuracy": [],
        }
        for name in contenders
    }
    for round_no in range(args.rounds):
        for name, cmd in contenders.items():
            wall, peak, private, stdout = timed_with_memory(cmd, env)
            if name.startswith("train stage"):
                epochs, accuracy = train_stage_epochs(store)
            else:
                result = last_json_line(stdout)
                epochs, accuracy = result["epoch_seconds"], result["val_accuracy"]
            figures[name]["epoch_s"] += epochs[1:]  # the first epoch traces and compiles
            figures[name]["process_s"].append(wall)
            figures[name]["peak_mib"].append(peak)
            figures[name]["private_peak_mib"].append(private)
            figures[name]["val_accuracy"].append(accuracy)
            print(
                f"round {round_no + 1}/{args.rounds} {name}: {wall:.1f}s, "
                f"epochs {statistics.median(epochs[1:]):.2f}s, peak {peak:.0f} MiB "
                f"({private:.0f} MiB private), "
                f"val_accuracy {accuracy:.4f}",
                flush=True,
            )

    # Orchestration: the pipeline's four commands run bare, then through `dvc repro -f`.
    dvc = str(Path(sys.executable).parent / "dvc")
    bare, orchestrated, noop = [], [], []
    for _ in range(0 if args.training_only else args.rounds):
        started = time.perf_counter()
        for cmd in stage_commands():
            subprocess.run(cmd, shell=True, cwd=REPO, env=env, check=True, capture_output=True)
        bare.append(time.perf_counter() - started)
        orchestrated.append(timed([dvc, "repro", "-f"], env)[0])
        noop.append(timed([dvc, "repro"], env)[0])

    # Holdout: the tutorial's ten predict calls vs one batched call on the trained model.
    loop = [
        sys.executable,
        "bench/tutorial_keras.py",
        "--data",
        str(raw),
        "--epochs",
        "1",
        "--predict-holdout",
    ]
    batched = [sys.executable, "bench/holdout.py", str(REPO / "models/model.keras"), str(processed)]
    rounds = 0 if args.training_only else args.rounds
    tutorial_holdout = [
        last_json_line(timed(loop, env)[2])["holdout_seconds"] for _ in range(rounds)
    ]
    ours = [last_json_line(timed(batched, env)[2])["holdout_seconds"] for _ in range(rounds)]
    overhead = system_metrics_overhead(rounds, args.epochs, env, scratch) if rounds else None

    results = {
        "machine": machine(),
        "epochs_per_process": args.epochs,
        "rounds": args.rounds,
        "contenders": {name: {k: summary(v) for k, v in f.items()} for name, f in figures.items()},
        "dvc_repro_force_s": summary(orchestrated),
        "bare_stage_commands_s": summary(bare),
        "noop_dvc_repro_s": summary(noop),
        "holdout_tutorial_loop_s": summary(tutorial_holdout),
        "holdout_batched_s": summary(ours),
        "system_metrics_overhead": overhead,
    }
    lines = render(results)
    print("\n".join(lines))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    (args.out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print(f"bench: wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def render(results: dict) -> list[str]:
    c = results["contenders"]
    tutorial, torch = c["tutorial script"], c["pytorch"]

    def row(
        label: str,
        fig: dict | None,
        unit: str,
        vs_tutorial: dict | None = None,
        vs_torch: dict | None = None,
    ) -> str:
        if fig is None:
            return f"| {label} | not measured | | | | |"
        ratio = lambda ref: f"{fig['median'] / ref['median']:.2f}" if ref else "—"  # noqa: E731
        return (
            f"| {label} | {fig['median']:.3f} {unit} | {fig['min']:.3f} | {fig['max']:.3f} "
            f"| {ratio(vs_tutorial)} | {ratio(vs_torch)} |"
        )

    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; "
        f"threads: {m['thread_env']}.",
        f"{results['rounds']} interleaved rounds x {results['epochs_per_process']} epochs "
        "per process "
        "(epoch figures exclude each process's first epoch).",
        "",
        "| figure | median | min | max | / tutorial | / PyTorch |",
        "|---|---|---|---|---|---|",
    ]
    for name, fig in c.items():
        lines.append(
            row(
                f"{name}: epoch (train + validation)",
                fig["epoch_s"],
                "s",
                tutorial["epoch_s"],
                torch["epoch_s"],
            )
        )
    for name, fig in c.items():
        lines.append(
            row(
                f"{name}: whole process",
                fig["process_s"],
                "s",
                tutorial["process_s"],
                torch["process_s"],
            )
        )
    for name, fig in c.items():
        lines.append(
            row(
                f"{name}: peak memory",
                fig["peak_mib"],
                "MiB",
                tutorial["peak_mib"],
                torch["peak_mib"],
            )
        )
    for name, fig in c.items():
        if fig.get("private_peak_mib"):
            lines.append(
                row(
                    f"{name}: peak private memory",
                    fig["private_peak_mib"],
                    "MiB",
                    tutorial.get("private_peak_mib"),
                    torch.get("private_peak_mib"),
                )
            )
    for name, fig in c.items():
        lines.append(
            row(
                f"{name}: val_accuracy after {results['epochs_per_process']} epochs",
                fig["val_accuracy"],
                "",
            )
        )
    lines.append(
        row(
            "`dvc repro -f` (4 stages)",
            results["dvc_repro_force_s"],
            "s",
            results["bare_stage_commands_s"],
        )
    )
    lines.append(row("bare stage commands (4)", results["bare_stage_commands_s"], "s"))
    lines.append(row("no-op `dvc repro`", results["noop_dvc_repro_s"], "s"))
    lines.append(
        row("holdout: tutorial's 10 predict calls", results["holdout_tutorial_loop_s"], "s")
    )
    lines.append(
        row(
            "holdout: one batched call",
            results["holdout_batched_s"],
            "s",
            results["holdout_tutorial_loop_s"],
        )
    )
    lines.append("")
    lines.append(
        "Ratios of `dvc repro -f` are to the bare stage commands; "
        "of the batched holdout, to the loop."
    )
    if results.get("system_metrics_overhead"):
        lines += ["", *render_system_metrics(results["system_metrics_overhead"])]
    return lines


def render_system_metrics(overhead: dict) -> list[str]:
    """Sampled vs off, and their ratio: what system metrics cost the train stage."""
    sampled, off = overhead["sampled_s"], overhead["off_s"]
    every = f"every {overhead['interval_s']:g} s"
    return [
        f"System metrics: `dvc repro -f -s train` ({overhead['epochs']} epochs), "
        f"{sampled['n']} interleaved rounds.",
        "",
        "| system metrics | median | min | max |",
        "|---|---|---|---|",
        f"| sampled {every} | {sampled['median']:.2f} s | {sampled['min']:.2f} | "
        f"{sampled['max']:.2f} |",
        f"| off (0) | {off['median']:.2f} s | {off['min']:.2f} | {off['max']:.2f} |",
        "",
        f"Sampled / off: {overhead['ratio']:.3f} (medians).",
    ]


if __name__ == "__main__":
    sys.exit(main())
