"""The only reader of params.yaml: each section becomes a frozen, validated dataclass.

A stage asks for the sections dvc.yaml declares for it, e.g. `load_params(path, "train")`.
Every mistake (not YAML, a missing or unknown key, a wrong type, a value out of range) raises
`ParamsError` with one line naming the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from mnist_lstm.errors import UserError

FETCH_SOURCES = ("auto", "keras", "package", "path")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULES = ("constant", "cosine")
DISTRIBUTE = ("auto", "off")
LSTM_KERNELS = ("auto", "onednn", "keras")
# The holdout comes from the 10,000 test images and validation needs at least one of them.
MAX_HOLDOUT = 9999


class ParamsError(UserError):
    """params.yaml (or a `dvc exp run -S` override) holds something the pipeline cannot use."""


def _spec(kind: str, allowed: str = "", check=lambda value: True) -> dict[str, Any]:
    return {"kind": kind, "allowed": allowed, "check": check}


@dataclasses.dataclass(frozen=True)
class FetchParams:
    source: str = dataclasses.field(
        metadata=_spec("choice", "one of " + ", ".join(FETCH_SOURCES), lambda v: v in FETCH_SOURCES)
    )
    path: str = dataclasses.field(metadata=_spec("str"))
    url: str = dataclasses.field(
        metadata=_spec("str", "an http(s) URL", lambda v: v.startswith(("http://", "https://")))
    )
    timeout_s: float = dataclasses.field(metadata=_spec("number", "> 0", lambda v: v > 0))

    def __post_init__(self) -> None:
        if self.source == "path" and not self.path:
            raise ParamsError(
                "fetch.path must name a local .npz when fetch.source is 'path', got ''"
            )


@dataclasses.dataclass(frozen=True)
class NormalizeParams:
    holdout_size: int = dataclasses.field(
        metadata=_spec("int", f"1..{MAX_HOLDOUT}", lambda v: 1 <= v <= MAX_HOLDOUT)
    )


@dataclasses.dataclass(frozen=True)
class TrainParams:
    units: int = dataclasses.field(metadata=_spec("int", "> 0", lambda v: v > 0))
    batch_norm: bool = dataclasses.field(metadata=_spec("bool"))
    optimizer: str = dataclasses.field(
        metadata=_spec("choice", "one of " + ", ".join(OPTIMIZERS), lambda v: v in OPTIMIZERS)
    )
    learning_rate: float = dataclasses.field(metadata=_spec("number", "> 0", lambda v: v > 0))
    batch_size: int = dataclasses.field(metadata=_spec("int", "> 0", lambda v: v > 0))
    epochs: int = dataclasses.field(metadata=_spec("int", ">= 1", lambda v: v >= 1))
    seed: int = dataclasses.field(metadata=_spec("int", "0..2**32-1", lambda v: 0 <= v < 2**32))
    bidirectional: bool = dataclasses.field(metadata=_spec("bool"))
    layers: int = dataclasses.field(metadata=_spec("int", "1..4", lambda v: 1 <= v <= 4))
    dropout: float = dataclasses.field(metadata=_spec("number", "in [0, 1)", lambda v: 0 <= v < 1))
    schedule: str = dataclasses.field(
        metadata=_spec("choice", "one of " + ", ".join(SCHEDULES), lambda v: v in SCHEDULES)
    )
    augment_shift: int = dataclasses.field(metadata=_spec("int", "0..8", lambda v: 0 <= v <= 8))
    tuning_split: int = dataclasses.field(metadata=_spec("int", ">= 0", lambda v: v >= 0))
    distribute: str = dataclasses.field(
        metadata=_spec("choice", "one of " + ", ".join(DISTRIBUTE), lambda v: v in DISTRIBUTE)
    )
    lstm_kernel: str = dataclasses.field(
        metadata=_spec("choice", "one of " + ", ".join(LSTM_KERNELS), lambda v: v in LSTM_KERNELS)
    )


DIRECTIONS = ("higher", "lower")


@dataclasses.dataclass(frozen=True)
class GateRule:
    """How one metric may change: `better` says which way is good."""

    better: str = dataclasses.field(
        metadata=_spec("choice", "one of " + ", ".join(DIRECTIONS), lambda v: v in DIRECTIONS)
    )
    # The absolute bound: a floor when higher is better, a ceiling when lower is better.
    limit: float | None = dataclasses.field(metadata=_spec("optional_number"))
    # How far the metric may move the bad way from the baseline.
    max_regression: float | None = dataclasses.field(
        metadata=_spec("optional_number", ">= 0", lambda v: v >= 0)
    )

    def __post_init__(self) -> None:
        if self.limit is None and self.max_regression is None:
            raise ParamsError("needs a limit, a max_regression or both (both are null)")


@dataclasses.dataclass(frozen=True)
class GateParams:
    """Regression rules per metric of reports/metrics.json, e.g. `rules["val_accuracy"]`."""

    rules: Mapping[str, GateRule]


SECTIONS: dict[str, type] = {
    "fetch": FetchParams,
    "normalize": NormalizeParams,
    "train": TrainParams,
    "gate": GateParams,
}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        for number in (int, float):
            try:
                return f"{value!r} (a string: write {number(value)!r})"
            except ValueError:
                continue
        return repr(value)
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _coerce(where: str, value: Any, spec: dict[str, Any]) -> Any:
    kind, allowed = spec["kind"], spec["allowed"]
    if kind == "optional_number" and value is None:
        return None  # null switches the rule off
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif kind in ("number", "optional_number"):
        # YAML 1.1 reads `1e-3` as a string, so a string here is an easy mistake to make.
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        expected = "a finite number" + (" or null" if kind == "optional_number" else "")
        value = float(value) if ok else value
    elif kind == "bool":
        ok = isinstance(value, bool)
        expected = "true or false"
    else:
        ok = isinstance(value, str)
        expected = "a string"
    if ok and spec["check"](value):
        return value
    rule = allowed if kind in ("choice", "str") and allowed else f"{expected} {allowed}".strip()
    raise ParamsError(f"{where} must be {rule}, got {_describe(value)}")


def parse_section(name: str, raw: Any, source: str = "params.yaml") -> Any:
    """Validate one section's mapping into its dataclass."""
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{source}: section '{name}' must be a mapping of keys, got {_describe(raw)}"
        )
    if name == "gate":
        return _parse_gate(raw, source)
    return _parse_fields(SECTIONS[name], name, raw, source)


def _parse_gate(raw: dict[str, Any], source: str) -> GateParams:
    if not raw:
        raise ParamsError(f"{source}: section 'gate' must name at least one metric")
    rules = {}
    for metric, rule in raw.items():
        if not isinstance(rule, dict):
            raise ParamsError(
                f"{source}: gate.{metric} must be a mapping with better, limit, max_regression, "
                f"got {_describe(rule)}"
            )
        rules[str(metric)] = _parse_fields(GateRule, f"gate.{metric}", rule, source)
    return GateParams(rules=MappingProxyType(rules))


def _parse_fields(cls: type, name: str, raw: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{name}.{close[0]}'?)" if close else ""
            raise ParamsError(
                f"{source}: unknown key '{name}.{key}'{hint}; allowed: {', '.join(fields)}"
            )
    values = {}
    for key, field in fields.items():
        if key not in raw:
            raise ParamsError(f"{source}: missing key '{name}.{key}'")
        values[key] = _coerce(f"{source}: {name}.{key}", raw[key], dict(field.metadata))
    try:
        return cls(**values)
    except ParamsError as err:
        where = f"{name} " if cls is GateRule else ""
        raise ParamsError(f"{source}: {where}{err}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """The whole params file as a mapping, or a ParamsError naming what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot be read ({err})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid syntax"
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise ParamsError(
            f"{path}: must be a mapping with sections {', '.join(SECTIONS)}, got {_describe(doc)}"
        )
    return doc


def load_params(path: Path, *names: str) -> tuple[Any, ...]:
    """The named sections of the params file, validated, in the order asked for."""
    doc = read_yaml(path)
    sections = []
    for name in names:
        if name not in doc:
            raise ParamsError(f"{path}: missing section '{name}'")
        sections.append(parse_section(name, doc[name], source=str(path)))
    return tuple(sections)


def flatten(*sections: Any) -> dict[str, Any]:
    """`{"train.units": 64, ...}` for logging: one key per param, named as in params.yaml."""
    flat: dict[str, Any] = {}
    for section in sections:
        name = next(key for key, cls in SECTIONS.items() if isinstance(section, cls))
        for key, value in dataclasses.asdict(section).items():
            flat[f"{name}.{key}"] = value
    return flat
