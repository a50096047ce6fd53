"""The fused LSTM op's shared library: can it exist here, is it current, and building it.

The op (`csrc/onednn_lstm.cc`) is an accelerator, never a requirement: it needs Linux x86-64, the
oneDNN wheel (installed there only) and a C++ compiler. `make install` runs `python -m
mnist_lstm.onednn_build`, which builds it when it can and otherwise says in one line what was
skipped and what that costs; training then uses Keras' own LSTM.

Every build compiles the sha256 of its source into the library. `current_library()` reads it back
before anything loads the op, so a library built from another source is refused instead of
training with an old binary while dvc.lock records the new source. Only `make install` compiles:
the train stage never does (an edit of the source makes `auto` train with Keras' LSTM, and
`onednn` stop, each saying in one line that `make install` rebuilds the op).

Imports no TensorFlow (a build asks a child process for its flags): `make install` learns whether
to build in a tenth of a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mnist_lstm.errors import UserError, exits_cleanly

SOURCE = Path(__file__).parent / "csrc" / "onednn_lstm.cc"
# The library embeds "<marker><sha256 of the source>" (see the .cc file's kSourceHash).
HASH_MARKER = b"mnist-lstm-onednn-source-sha256:"
COMPILERS = ("g++", "c++", "clang++")
OP_DIR_ENV = "MNIST_LSTM_OP_DIR"
# CI states the kernel training must use (.ci/run, tools/arm-check); `onednn` there makes a build
# that cannot happen an error, as --require does: CI fails instead of training with Keras' LSTM.
EXPECT_KERNEL_ENV = "MNIST_LSTM_EXPECT_KERNEL"
# What running without the op costs, as `make bench` measured it (docs/performance.md).
COST = "Keras' LSTM trains instead, ~1.6x slower per epoch on a 2-core x86-64 CPU"


class OpUnavailable(UserError):
    """The fused op cannot be used here; the message says why in one line."""


def library_path(prefix: str | Path = sys.prefix) -> Path:
    """Built per environment (it links that environment's TensorFlow and oneDNN), so it lives in
    the venv, outside the sources DVC hashes -- or in $MNIST_LSTM_OP_DIR (an empty folder there
    hides a built op: how CI runs the suite without it)."""
    folder = os.environ.get(OP_DIR_ENV)
    if folder:
        return Path(folder) / "onednn_lstm.so"
    return Path(prefix) / "lib" / "mnist-lstm" / "onednn_lstm.so"


def log_path(prefix: str | Path = sys.prefix) -> Path:
    return library_path(prefix).with_name("build.log")


def source_hash(source: Path = SOURCE) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def built_hash(library: Path) -> str | None:
    """The source hash compiled into `library`, or None when it has none (or does not exist)."""
    try:
        data = library.read_bytes()
    except FileNotFoundError:
        return None
    found = re.search(re.escape(HASH_MARKER) + rb"([0-9a-f]{64})", data)
    return found.group(1).decode() if found else None


def compiler() -> str | None:
    """$CXX when set, else the first C++ compiler on PATH."""
    chosen = os.environ.get("CXX")
    for name in ([chosen] if chosen else []) + list(COMPILERS):
        found = shutil.which(name)
        if found:
            return found
    return None


def platform_problem() -> str | None:
    """Why this machine cannot run the op at all, or None."""
    machine = platform.machine()
    if sys.platform != "linux" or machine != "x86_64":
        return f"it is built for Linux x86-64 only (this is {sys.platform} {machine})"
    return None


def build_problem(prefix: str | Path = sys.prefix) -> str | None:
    """Why the op cannot be built in this environment, or None when it can."""
    problem = platform_problem()
    if problem:
        return problem
    if not (Path(prefix) / "lib" / "libdnnl.so").exists():
        return f"the oneDNN wheel is not installed in {prefix} (onednn-cpu-gomp, from the lock)"
    if compiler() is None:
        return "no C++ compiler on PATH (g++, c++ or clang++; or set CXX)"
    return None


def build(out: Path, prefix: str | Path = sys.prefix) -> None:
    """Compile the op against this TensorFlow and the oneDNN wheel in `prefix`, atomically.

    A failure raises OpUnavailable naming the log that holds the compiler's output.
    """
    problem = build_problem(prefix)
    if problem:
        raise OpUnavailable(f"cannot build the oneDNN LSTM op: {problem}")
    lib = Path(prefix) / "lib"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = log_path(prefix)
    with open(log, "w") as log_file:
        compile_flags, link_flags = _tensorflow_flags(log_file)
    # TensorFlow's headers as system headers: their warnings are not ours.
    tf_flags = [f"-isystem{flag[2:]}" if flag.startswith("-I") else flag for flag in compile_flags]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    command = [
        compiler(), "-O2", "-Wall", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp),
        f'-DMNIST_LSTM_SOURCE_SHA256="{source_hash()}"',
        *tf_flags, f"-I{Path(prefix) / 'include'}",
        *link_flags, f"-L{lib}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
    with open(log, "a") as log_file:
        log_file.write(" ".join(command) + "\n\n")
        log_file.flush()
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OpUnavailable(
            f"compiling the oneDNN LSTM op failed (exit {result.returncode}); see {log}"
        )
    # Renamed into place: a process that already loaded the old file keeps its copy.
    os.replace(tmp, out)


def _tensorflow_flags(log_file) -> tuple[list[str], list[str]]:
    """TensorFlow's compile and link flags, asked of a child process: importing TensorFlow prints
    start-up chatter, which belongs in the build log, not in `make install`'s one line."""
    query = (
        "import json, tensorflow as tf; "
        "print(json.dumps([tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", query], stdout=subprocess.PIPE, stderr=log_file, text=True
    )
    if result.returncode != 0:
        raise OpUnavailable(f"TensorFlow's build flags are unavailable; see {log_file.name}")
    compile_flags, link_flags = json.loads(result.stdout.strip().splitlines()[-1])
    return compile_flags, link_flags


def current_library() -> Path:
    """The library built from the current source, for training to load; OpUnavailable saying why
    (missing, or stale: built from another source) and whether `make install` can build it here.
    Never compiles: a build belongs to `make install`, not to a `dvc repro` stage."""
    problem = platform_problem()
    if problem:
        raise OpUnavailable(problem)
    path = library_path()
    built = built_hash(path)
    if built == source_hash():
        return path
    state, verb = (
        ("missing (not built)", "build")
        if built is None
        else (f"stale (built from another {SOURCE.name})", "rebuild")
    )
    problem = build_problem()
    remedy = (
        f"`make install` cannot {verb} it here: {problem}"
        if problem
        else f"`make install` {verb}s it"
    )
    raise OpUnavailable(f"the oneDNN LSTM op is {state}; {remedy}")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    """`make install`'s step: build the op when possible; one line either way, exit 0 unless
    --require is given or $MNIST_LSTM_EXPECT_KERNEL is onednn (then a missing op is an error)."""
    parser = argparse.ArgumentParser(description="Build the optional oneDNN LSTM op.")
    parser.add_argument("--prefix", default=sys.prefix, help="the environment to build into")
    parser.add_argument("--require", action="store_true", help="exit 1 when the op cannot be built")
    args = parser.parse_args(argv)
    path = library_path(args.prefix)
    built = built_hash(path)
    if built == source_hash():
        print(f"oneDNN LSTM op: up to date ({path})")
        return 0
    try:
        build(path, args.prefix)
    except OpUnavailable as err:
        if args.require:
            raise
        if os.environ.get(EXPECT_KERNEL_ENV) == "onednn":
            raise OpUnavailable(f"{err} ({EXPECT_KERNEL_ENV}=onednn: the op is required)") from None
        reason = str(err).removeprefix("cannot build the oneDNN LSTM op: ")
        print(f"oneDNN LSTM op: skipped ({reason}); {COST}. Installation goes on.")
        return 0
    stale = "" if built is None else f" (it was built from another {SOURCE.name})"
    print(f"oneDNN LSTM op: built {path}{stale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
