"""Stage `evaluate`: score the trained model on validation and the holdout, and report it.

Reads the processed `.npz`, the model file, the training history and the fetch provenance; writes
the metrics JSON (a DVC metric), the per-class table and confusion matrix (CSV), the holdout
predictions (CSV) and two PNGs. Prints the tutorial's ten holdout lines, `[prediction] label`.
Logs everything into the MLflow run that trained this exact model file (see tracking/__init__.py),
with the system metrics sampled while it scores (params `system_metrics`, read from `--params`:
not a DVC dependency, as it changes no output).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy.special import softmax  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from mnist_lstm import contracts, tracking  # noqa: E402
from mnist_lstm.errors import exits_cleanly, one_line  # noqa: E402
from mnist_lstm.params import load_params  # noqa: E402
from mnist_lstm.runtime import keras  # noqa: E402
from mnist_lstm.tracking import system_metrics  # noqa: E402

CLASSES = list(range(contracts.NUM_CLASSES))


def load_model(path: Path) -> keras.Model:
    """Keras' safe mode: a model file can never run code that arrives with it."""
    path = Path(path)
    if not path.is_file():
        raise contracts.ContractError(f"{path}: file not found")
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - Keras raises many types for a damaged archive
        raise contracts.ContractError(
            f"{path}: not a loadable Keras model ({one_line(err)})"
        ) from None
    if model.output_shape != (None, contracts.NUM_CLASSES):
        raise contracts.ContractError(
            f"{path}: model outputs {model.output_shape}, expected (None, {contracts.NUM_CLASSES})"
        )
    return model


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean sparse categorical cross-entropy from logits, as the training loss computes it."""
    return float(skm.log_loss(y, softmax(logits.astype(np.float64), axis=1), labels=CLASSES))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Rows are true digits, columns predicted digits; every digit appears even if unseen."""
    table = pd.DataFrame(
        skm.confusion_matrix(y_true, y_pred, labels=CLASSES),
        index=pd.Index(CLASSES, name="true"),
        columns=pd.Index(CLASSES, name="predicted"),
    )
    return table.astype(np.int64)


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support per digit (scikit-learn's classification report);
    0.0 where a ratio has no denominator."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=CLASSES, zero_division=0.0
    )
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)},
        index=pd.Index(CLASSES, name="digit"),
    )


def predict_logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Logits in one direct call: no `predict` loop (it builds a dataset and a step function for
    every call, which for the 10 holdout images costs more than the prediction)."""
    return keras.ops.convert_to_numpy(model(x, training=False))


def score(model: keras.Model, data: dict[str, np.ndarray]) -> dict:
    """Everything evaluate reports, computed from one prediction per split."""
    val_logits = np.concatenate(
        [
            predict_logits(model, data["x_val"][i : i + 1024])
            for i in range(0, len(data["x_val"]), 1024)
        ]
    )
    # The tutorial predicted one image per call; one batched call gives the same digits.
    holdout_logits = predict_logits(model, data["x_holdout"])
    val_pred = val_logits.argmax(axis=1)
    holdout_pred = holdout_logits.argmax(axis=1)
    matrix = confusion_matrix(data["y_val"], val_pred)
    report = per_class_report(data["y_val"], val_pred)
    holdout = pd.DataFrame(
        {
            "index": np.arange(len(holdout_pred)),
            "label": data["y_holdout"].astype(np.int64),
            "prediction": holdout_pred.astype(np.int64),
            "confidence": softmax(holdout_logits.astype(np.float64), axis=1).max(axis=1),
        }
    )
    metrics = {
        "val_accuracy": float((val_pred == data["y_val"]).mean()),
        "val_loss": cross_entropy(val_logits, data["y_val"]),
        "holdout_accuracy": float((holdout_pred == data["y_holdout"]).mean()),
        "val_macro_f1": float(report["f1"].mean()),
        "val_images": int(len(data["y_val"])),
        "holdout_images": int(len(data["y_holdout"])),
    }
    # One row per validation image: what `dvc plots` draws its confusion matrix from.
    val_predictions = pd.DataFrame(
        {"actual": data["y_val"].astype(np.int64), "predicted": val_pred.astype(np.int64)}
    )
    return {
        "metrics": metrics,
        "matrix": matrix,
        "report": report,
        "holdout": holdout,
        "val_predictions": val_predictions,
    }


def plot_confusion(matrix: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    counts = matrix.to_numpy()
    image = ax.imshow(counts, cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        color = "white" if count > counts.max() / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=CLASSES, yticks=CLASSES, xlabel="predicted digit", ylabel="true digit")
    ax.set_title("Validation confusion matrix")
    fig.colorbar(image, ax=ax)
    _save_figure(fig, path)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("loss", "accuracy"), ("cross-entropy loss", "accuracy")):
        ax.plot(history["epoch"], history[metric], marker="o", label="train")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label.capitalize()} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    _save_figure(fig, path)


def _save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with contracts.atomic_path(path) as tmp:
        # No software/version stamp in the file: identical results give identical bytes.
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_csv(path: Path, table: pd.DataFrame, index: bool) -> None:
    with contracts.atomic_path(path) as tmp:
        table.to_csv(tmp, index=index, float_format="%.6f")


def load_history(path: Path) -> pd.DataFrame:
    path = Path(path)
    try:
        history = pd.read_csv(path)
    except FileNotFoundError:
        raise contracts.ContractError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise contracts.ContractError(f"{path}: not a readable CSV ({one_line(err)})") from None
    missing = [
        c for c in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy") if c not in history
    ]
    if missing:
        raise contracts.ContractError(f"{path}: missing column(s) {', '.join(missing)}")
    return history


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = contracts.stage_arguments(
        __doc__,
        argv,
        "data",
        "model",
        "history",
        "provenance",
        "metrics",
        "per-class",
        "confusion",
        "holdout",
        "val-predictions",
        "confusion-png",
        "curves-png",
    )

    (monitoring,) = load_params(args.params, "system_metrics")
    data = contracts.load_processed(args.data)
    model = load_model(args.model)
    history = load_history(args.history)
    provenance = contracts.read_json(args.provenance)
    model_md5 = contracts.md5_file(args.model)

    lineage = {
        "data.fetch_source": str(provenance.get("source", "unknown")),
        "data.raw_sha256": str(provenance.get("raw_sha256", "unknown")),
        tracking.TAG_RAW_MD5: str(provenance.get("raw_md5", "unknown")),
        tracking.TAG_PROCESSED_MD5: contracts.md5_file(args.data),
    }
    reports = [
        args.metrics,
        args.per_class,
        args.confusion,
        args.holdout,
        args.val_predictions,
        args.confusion_png,
        args.curves_png,
    ]
    # The run opens before the work: a store that is down fails here, in one line.
    with (
        tracking.evaluation_run(model_md5, fallback_name=f"evaluate-{model_md5[:12]}") as (
            run,
            is_training_run,
        ),
        # Its samples follow train's in the same series (their steps go on where train's end).
        system_metrics.sampling(run, monitoring.interval_s, resume=True),
    ):
        how = "the run that trained it" if is_training_run else "a new run (none trained this file)"
        print(f"evaluate: logging to {how} ({run.run_id})", flush=True)
        run.log_datasets(
            [
                tracking.dataset(
                    "mnist-validation",
                    args.data,
                    lineage[tracking.TAG_PROCESSED_MD5],
                    data["x_val"],
                    data["y_val"],
                    "validation",
                ),
                tracking.dataset(
                    "mnist-holdout",
                    args.data,
                    lineage[tracking.TAG_PROCESSED_MD5],
                    data["x_holdout"],
                    data["y_holdout"],
                    "holdout",
                ),
            ]
        )
        result = score(model, data)
        metrics = {key: round(value, 6) for key, value in result["metrics"].items()}
        contracts.write_json(args.metrics, metrics)
        write_csv(args.per_class, result["report"], index=True)
        write_csv(args.confusion, result["matrix"], index=True)
        write_csv(args.holdout, result["holdout"], index=False)
        write_csv(args.val_predictions, result["val_predictions"], index=False)
        plot_confusion(result["matrix"], args.confusion_png)
        plot_history(history, args.curves_png)

        print("holdout ([prediction] label):")
        for row in result["holdout"].itertuples():
            print(f"[{row.prediction}] {row.label}")
        print(", ".join(f"{key} {value}" for key, value in metrics.items()))
        tracking.log_evaluation(run, metrics, reports, lineage)
    print(f"evaluate: logged to {how}: {run.where()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
