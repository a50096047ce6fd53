"""Keras and TensorFlow as every module here imports them, and how a training process allocates.

Modules write `from mnist_lstm.runtime import keras, tf` instead of importing them directly, for
one reason: on its first import Keras tries `import sklearn` (for `keras.wrappers`) and
`import matplotlib.pyplot` (for `keras.visualization`), "just in case". Both are installed here
(MLflow depends on them; `evaluate` draws its PNGs with matplotlib), so every process that
imported Keras paid for two packages the pipeline never calls through Keras: 82 MiB resident and
~0.9 s (docs/performance-engineering.md). Keras already treats both as optional and leaves those
two helpers unusable when they are missing; this import hides them for exactly as long as Keras
loads, so any later `import matplotlib.pyplot` -- evaluate's -- works as usual.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Not needed by anything this project calls in Keras; see the module docstring.
KERAS_OPTIONAL = ("sklearn", "matplotlib")


def _hide(names: tuple[str, ...]) -> tuple[str, ...]:
    # None in sys.modules is Python's documented "not importable" marker: `import sklearn` raises
    # ImportError, which is what Keras catches. Packages already imported stay visible.
    hidden = tuple(name for name in names if name not in sys.modules)
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden


def _unhide(names: tuple[str, ...]) -> None:
    for name in names:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


# TensorFlow's CPU tensors from its best-fit-with-coalescing allocator, the one it uses on GPUs,
# instead of straight from malloc. From malloc, the buffers every training step allocates and
# frees (a few MiB each) left glibc's arenas 60-100 MiB larger than what was in use, freed but
# kept, and the peak drifted up from epoch to epoch; BFC keeps one pool sized to the tensors
# alive at once and reuses it: lower and steadier peak memory, epochs no slower, the same model
# file (docs/performance-engineering.md). Read when TensorFlow first allocates: set before it
# loads. A value in the environment wins (false switches it off).
BFC_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
os.environ.setdefault(BFC_ENV, "true")

# TensorFlow's own graph rewrites to oneDNN kernels (MatMul, BiasAdd, ... as _Mkl* ops; not the
# project's fused LSTM op, which calls oneDNN itself) off: Keras' unrolled LSTM runs 28 small
# matmuls per step each way, and for those Eigen's kernels beat oneDNN's per-call set-up -- 12%
# faster epochs (4.41 vs 4.99 s, 10 epochs on the 2-core AMD EPYC) with byte-identical model
# files, and no change with the fused op (docs/performance-engineering.md). Read when TensorFlow
# loads. A value in the environment wins (1 switches them back on).
ONEDNN_OPTS_ENV = "TF_ENABLE_ONEDNN_OPTS"
os.environ.setdefault(ONEDNN_OPTS_ENV, "0")

_hidden = _hide(KERAS_OPTIONAL)
try:
    import keras
    import tensorflow as tf
finally:
    _unhide(_hidden)

__all__ = ["keras", "tf", "limit_malloc_arenas"]

# glibc's mallopt() parameter for the number of malloc arenas (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2, env: dict[str, str] | None = None) -> bool:
    """Cap glibc's malloc arenas for the threads started from now on; True if it took effect.

    glibc gives allocating threads arenas of their own, up to 8 per core. TensorFlow's op and
    tf.data threads allocate and free each batch's tensors in whichever arena they hold, and the
    freed memory stays mapped, scattered over all of them: the train stage's resident memory grew
    ~10 MiB per epoch for the first seven epochs (+80 MiB). Two arenas stop the growth with no
    measurable cost in speed (docs/performance-engineering.md). A MALLOC_ARENA_MAX already set in
    the environment wins; other C libraries (macOS, musl) are left alone.
    """
    if "MALLOC_ARENA_MAX" in (os.environ if env is None else env):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))
