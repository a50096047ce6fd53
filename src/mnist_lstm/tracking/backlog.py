"""How far tracking is behind, in words: what a spool's ops hold, counted by kind, for the
one-line reports of stages, `make sync` and `make lineage`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def count_ops(ops: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> dict[str, int]:
    """How much an op list holds, by kind: what 'tracking is behind' reports."""
    counts = {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "datasets": 0, "models": 0}
    for op in ops:
        kind = op["op"]
        if kind == "metrics":
            counts["metrics"] += len(op["metrics"])
        elif kind == "params":
            counts["params"] += len(op["params"])
        elif kind == "tags":
            counts["tags"] += len(op["tags"])
        elif kind == "artifact":
            counts["artifacts"] += len(op.get("files", []))
        elif kind == "inputs":
            counts["datasets"] += len(op["datasets"])
        elif kind == "model":
            counts["models"] += 1
    return counts


def describe(ops: list[dict[str, Any]]) -> str:
    """`12 metric values, 3 params, 7 artifacts, the model` for a one-line report."""
    counts = count_ops(ops)
    parts = [
        f"{n} {name if n != 1 else name.rstrip('s')}"
        for name, n in (
            ("metric values", counts["metrics"]),
            ("params", counts["params"]),
            ("tags", counts["tags"]),
            ("artifacts", counts["artifacts"]),
            ("datasets", counts["datasets"]),
        )
        if n
    ]
    if counts["models"]:
        parts.append("the model")
    return ", ".join(parts) or f"{len(ops)} status change(s)"
