"""Prove that uv.lock installs on every platform and Python the project supports; installs nothing.

For each target -- Linux x86-64 and aarch64, macOS arm64, Windows x86-64, each on Python 3.11, 3.12
and 3.13 -- uv resolves the lock's exact pins (`uv export`, every extra) against the registry as
that machine would, from wheels only, so a machine without a compiler can install it. The one
exception is a package that publishes no wheel at all and is pure Python (PURE_PYTHON_SDISTS).
A target passes when resolution succeeds and picks exactly the lock's version of every package it
needs. `make lock-check` runs it; `uv lock --check` (in the tests) proves lock and pyproject agree.

    python tools/check_lock.py [--lock uv.lock] [--uv .tools/bin/uv] [--target PLATFORM PYTHON]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PLATFORMS = (
    "x86_64-manylinux_2_28",
    "aarch64-manylinux_2_28",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
)
PYTHONS = ("3.11", "3.12", "3.13")
# No wheel on PyPI, pure Python (hydra-core's parser runtime, via dvc): builds with no compiler.
PURE_PYTHON_SDISTS = frozenset({"antlr4-python3-runtime"})
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;]+)", re.MULTILINE)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, set[str]]:
    """Every registry package the lock pins, by normalized name: a package may be pinned to a
    different version per Python (numpy's newest releases need 3.12)."""
    versions: dict[str, set[str]] = {}
    for package in tomllib.loads(lock.read_text())["package"]:
        if "registry" in package.get("source", {}):
            versions.setdefault(normalize(package["name"]), set()).add(package["version"])
    return versions


def export(uv: str, project: Path, out: Path) -> None:
    """The lock as a requirements file: exact pins with their platform markers, all extras."""
    subprocess.run(
        [uv, "export", "--frozen", "--no-hashes", "--all-extras", "--no-emit-project",
         "--no-header", "--no-annotate", "-o", str(out)],
        cwd=project, check=True, capture_output=True, text=True,
    )  # fmt: skip


def check_target(
    uv: str, requirements: Path, locked: dict[str, set[str]], platform: str, python: str
) -> str | None:
    """None when the target resolves to the lock's pins; otherwise what went wrong, one line."""
    wheels_only = [
        arg for name in sorted(set(locked) - PURE_PYTHON_SDISTS) for arg in ("--only-binary", name)
    ]
    result = subprocess.run(
        [uv, "pip", "compile", str(requirements), "--python-platform", platform,
         "--python-version", python, "--no-header", "--no-annotate", "--quiet", *wheels_only],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        because = next((line for line in lines if "Because" in line or "because" in line), None)
        return (because or (lines[-1] if lines else f"uv exited {result.returncode}"))[:400]
    resolved = {normalize(name): version for name, version in PIN.findall(result.stdout)}
    if not resolved:
        return "resolved to nothing"
    drift = [
        f"{name}=={version} (lock: {' or '.join(sorted(locked.get(name, ['absent'])))})"
        for name, version in sorted(resolved.items())
        if version not in locked.get(name, set())
    ]
    if drift:
        return "resolved outside the lock: " + ", ".join(drift)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=Path("uv.lock"))
    parser.add_argument("--uv", default=shutil.which("uv") or ".tools/bin/uv")
    parser.add_argument("--target", nargs=2, action="append", metavar=("PLATFORM", "PYTHON"))
    args = parser.parse_args(argv)
    targets = args.target or [(p, v) for p in PLATFORMS for v in PYTHONS]
    if not Path(args.uv).exists() and not shutil.which(args.uv):
        print(f"error: uv not found at {args.uv}: run `make install` first", file=sys.stderr)
        return 1
    locked = locked_versions(args.lock)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        export(args.uv, args.lock.resolve().parent, requirements)
        # Each resolution mostly waits on the registry: four at a time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            problems = list(
                pool.map(
                    lambda target: check_target(args.uv, requirements, locked, *target), targets
                )
            )
    for (platform, python), problem in zip(targets, problems):
        verdict = f"FAIL {problem}" if problem else "ok, resolves to the lock's pins"
        print(f"{platform} Python {python}: {verdict}")
    failed = sum(problem is not None for problem in problems)
    print(f"{len(targets) - failed}/{len(targets)} targets resolve to {args.lock}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
