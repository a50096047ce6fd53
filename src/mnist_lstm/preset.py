"""A named preset as `dvc exp run` overrides: `python -m mnist_lstm.preset params.tuned.yaml`.

The preset file holds a subset of params.yaml (e.g. a `train:` section with the keys it changes).
It is validated against params.yaml -- the merged result must be a valid configuration -- and
printed as `-S section.key=value ...`, so `dvc exp run $(python -m mnist_lstm.preset FILE)` runs
it as an experiment, tracked, comparable and restorable with `dvc exp apply`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnist_lstm.errors import exits_cleanly
from mnist_lstm.params import ParamsError, parse_section, read_yaml


def overrides(preset: dict, base: dict, preset_source: str) -> list[str]:
    """`-S` arguments for every key in `preset`; the merged params must validate."""
    args = []
    for section, values in preset.items():
        if section not in base or not isinstance(values, dict):
            raise ParamsError(f"{preset_source}: '{section}' is not a params.yaml section mapping")
        parse_section(section, {**base[section], **values}, source=preset_source)
        for key, value in values.items():
            # JSON spells booleans/numbers the way YAML reads them back (true, 0.001).
            args += ["-S", f"{section}.{key}={json.dumps(value)}"]
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    print(" ".join(overrides(read_yaml(args.preset), read_yaml(args.params), str(args.preset))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
