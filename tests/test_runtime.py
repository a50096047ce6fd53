from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mnist_lstm.runtime import limit_malloc_arenas


def test_keras_loads_without_sklearn_and_matplotlib_which_stay_importable_afterwards():
    # A fresh interpreter: this test process imported Keras long ago.
    code = (
        "import sys\n"
        "from mnist_lstm.runtime import keras, tf\n"
        "print(sorted(name for name in ('sklearn', 'matplotlib') if name in sys.modules))\n"
        "keras.layers.Dense(1)(tf.zeros((1, 2)))\n"
        "import matplotlib.pyplot, sklearn\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "imported"]


def test_a_malloc_arena_limit_set_in_the_environment_is_left_alone():
    assert limit_malloc_arenas(env={"MALLOC_ARENA_MAX": "8"}) is False
    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas(env={}) is True


def tensorflow_stderr(log_level: str | None) -> str:
    """What a fresh process that imports the package, then TensorFlow, and runs an op prints on
    stderr; `log_level` is the user's own TF_CPP_MIN_LOG_LEVEL (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if log_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = log_level
    code = "import mnist_lstm\nimport tensorflow as tf\nprint(int(tf.constant(1) + 1))\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_tensorflows_cpp_log_is_off_unless_the_user_asks_for_it():
    shown = tensorflow_stderr("0")
    if "cuInit" not in shown:
        pytest.skip("TensorFlow prints no cuInit error here (a GPU, or a build without CUDA)")
    hidden = tensorflow_stderr(None)
    assert "cuInit" not in hidden, hidden
    assert "oneDNN custom operations" not in hidden, hidden
