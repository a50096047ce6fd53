"""The only reader of params.yaml: each section becomes a frozen, validated pydantic model.

A stage asks for the sections dvc.yaml declares for it, e.g. `load_params(path, "train")`.
Every mistake (not YAML, a missing or unknown key, a wrong type, a value out of range) raises
`ParamsError` with one line naming the file, the key, the value and what is allowed: each field's
`description` is that rule in words, and pydantic's first error picks the field.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from mnist_lstm.errors import UserError, one_line

# The holdout comes from the 10,000 test images and validation needs at least one of them.
MAX_HOLDOUT = 9999
# YAML 1.1 reads `1e-3` as a string: strict mode refuses it rather than guess, as it refuses
# booleans and 2.5 for integers. Ints are accepted for numbers (and become floats).
Number = Annotated[float, Field(allow_inf_nan=False)]
# In a gate rule, null switches that rule off.
OptionalNumber = Number | None


class ParamsError(UserError):
    """params.yaml (or a `dvc exp run -S` override) holds something the pipeline cannot use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def __setattr__(self, name: str, value: Any) -> None:
        # Fail as a frozen dataclass does (AttributeError), not with pydantic's ValidationError.
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set '{name}'")


class FetchParams(_Section):
    source: Literal["auto", "keras", "package", "path"]
    path: str = Field(description="a string")
    url: str = Field(pattern=r"^https?://", description="an http(s) URL")
    timeout_s: Number = Field(gt=0, description="a finite number > 0")

    @model_validator(mode="after")
    def _path_source_needs_a_path(self) -> FetchParams:
        if self.source == "path" and not self.path:
            raise ValueError(
                "fetch.path must name a local .npz when fetch.source is 'path', got ''"
            )
        return self


class NormalizeParams(_Section):
    holdout_size: int = Field(ge=1, le=MAX_HOLDOUT, description=f"an integer 1..{MAX_HOLDOUT}")


class TrainParams(_Section):
    units: int = Field(gt=0, description="an integer > 0")
    batch_norm: bool = Field(description="true or false")
    optimizer: Literal["sgd", "adam", "rmsprop"]
    learning_rate: Number = Field(gt=0, description="a finite number > 0")
    batch_size: int = Field(gt=0, description="an integer > 0")
    epochs: int = Field(ge=1, description="an integer >= 1")
    seed: int = Field(ge=0, lt=2**32, description="an integer 0..2**32-1")
    bidirectional: bool = Field(description="true or false")
    layers: int = Field(ge=1, le=4, description="an integer 1..4")
    # What of the last LSTM feeds the classifier: its final state, or every row's output pooled.
    readout: Literal["last", "pool"]
    dropout: Number = Field(ge=0, lt=1, description="a finite number in [0, 1)")
    schedule: Literal["constant", "cosine"]
    augment_shift: int = Field(ge=0, le=8, description="an integer 0..8")
    tuning_split: int = Field(ge=0, description="an integer >= 0")
    distribute: Literal["auto", "off"]
    # How many hosts train together (TF_CONFIG names them; checked against it). A param, so that
    # DVC's run-cache keeps a cluster's model apart from a one-host model of the same params.
    hosts: int = Field(ge=1, description="an integer >= 1")
    lstm_kernel: Literal["auto", "onednn", "keras"]


class GateRule(_Section):
    """How one metric may change: `better` says which way is good."""

    better: Literal["higher", "lower"]
    # The absolute bound: a floor when higher is better, a ceiling when lower is better.
    limit: OptionalNumber = Field(description="a finite number or null")
    # How far the metric may move the bad way from the baseline.
    max_regression: OptionalNumber = Field(ge=0, description="a finite number or null >= 0")

    @model_validator(mode="after")
    def _has_a_bound(self, info: ValidationInfo) -> GateRule:
        if self.limit is None and self.max_regression is None:
            # The rule does not know its metric: parsing passes its name as the context.
            name = (info.context or {}).get("name", "a gate rule")
            raise ValueError(f"{name} needs a limit, a max_regression or both (both are null)")
        return self


class GateParams(_Section):
    """Regression rules per metric of reports/metrics.json, e.g. `rules["val_accuracy"]`."""

    rules: Annotated[
        Mapping[str, GateRule], AfterValidator(MappingProxyType), PlainSerializer(dict)
    ]


class SystemMetricsParams(_Section):
    """How often train and evaluate sample the machine (tracking/system_metrics.py). Read by both
    stages, a dependency of neither: it changes no model, so changing it must not retrain."""

    # Seconds between samples; 0 switches sampling off.
    interval_s: Number = Field(ge=0, description="a finite number of seconds >= 0 (0: off)")


SECTIONS: dict[str, type[_Section]] = {
    "fetch": FetchParams,
    "normalize": NormalizeParams,
    "train": TrainParams,
    "gate": GateParams,
    "system_metrics": SystemMetricsParams,
}
_Model = TypeVar("_Model", bound=_Section)


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


def _validate(cls: type[_Model], name: str, raw: dict[str, Any], source: str) -> _Model:
    try:
        return cls.model_validate(raw, context={"name": name})
    except ValidationError as err:
        raise ParamsError(f"{source}: {_explain(cls, name, err)}") from None


def _explain(cls: type[_Section], name: str, err: ValidationError) -> str:
    """Pydantic's first error as one line; an unknown key first, as a typo is also a missing key."""
    unknown = ("extra_forbidden", "invalid_key")
    errors = err.errors()
    error = next((e for e in errors if e["type"] in unknown), errors[0])
    if not error["loc"]:  # a model validator's cross-field rule, worded in full
        return str(error["ctx"]["error"])
    key, fields = str(error["loc"][0]), cls.model_fields
    if error["type"] in unknown:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean '{name}.{close[0]}'?)" if close else ""
        return f"unknown key '{name}.{key}'{hint}; allowed: {', '.join(fields)}"
    if error["type"] == "missing":
        return f"missing key '{name}.{key}'"
    field = fields[key]
    rule = field.description or "one of " + ", ".join(get_args(field.annotation))
    return f"{name}.{key} must be {rule}, got {_describe(error['input'])}"


def parse_section(name: str, raw: Any, source: str = "params.yaml") -> Any:
    """Validate one section's mapping into its model."""
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{source}: section '{name}' must be a mapping of keys, got {_describe(raw)}"
        )
    if name != "gate":
        return _validate(SECTIONS[name], name, raw, source)
    if not raw:
        raise ParamsError(f"{source}: section 'gate' must name at least one metric")
    rules = {}
    for metric, rule in raw.items():
        if not isinstance(rule, dict):
            raise ParamsError(
                f"{source}: gate.{metric} must be a mapping with "
                f"{', '.join(GateRule.model_fields)}, got {_describe(rule)}"
            )
        rules[str(metric)] = _validate(GateRule, f"gate.{metric}", rule, source)
    return GateParams(rules=rules)


def read_yaml(path: Path) -> dict[str, Any]:
    """The whole params file as a mapping, or a ParamsError naming what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot be read ({one_line(err)})") from None
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


def flatten(*sections: _Section) -> dict[str, Any]:
    """`{"train.units": 64, ...}` for logging: one key per param, named as in params.yaml."""
    flat: dict[str, Any] = {}
    for section in sections:
        name = next(key for key, cls in SECTIONS.items() if isinstance(section, cls))
        for key, value in section.model_dump().items():
            flat[f"{name}.{key}"] = value
    return flat
