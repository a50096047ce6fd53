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


def fresh_process(code: str, user_env: dict[str, str | None]) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose environment has each of `user_env`'s variables set
    to its value, or unset where the value is None (what a user's shell would hold)."""
    env = {k: v for k, v in os.environ.items() if k not in user_env}
    env.update({k: v for k, v in user_env.items() if v is not None})
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def tensorflow_stderr(log_level: str | None) -> str:
    """What a fresh process that imports the package, then TensorFlow, and runs an op prints on
    stderr; `log_level` is the user's own TF_CPP_MIN_LOG_LEVEL (None: unset)."""
    code = "import mnist_lstm\nimport tensorflow as tf\nprint(int(tf.constant(1) + 1))\n"
    return fresh_process(code, {"TF_CPP_MIN_LOG_LEVEL": log_level}).stderr


def test_tensorflows_cpp_log_is_off_unless_the_user_asks_for_it():
    shown = tensorflow_stderr("0")
    if "cuInit" not in shown:
        pytest.skip("TensorFlow prints no cuInit error here (a GPU, or a build without CUDA)")
    hidden = tensorflow_stderr(None)
    assert "cuInit" not in hidden, hidden
    assert "oneDNN custom operations" not in hidden, hidden


def cpu_allocator_stats(env_value: str | None) -> str:
    """What a fresh process reports for the CPU's tensor memory after importing the package's
    TensorFlow and running an op; `env_value` is the user's own TF_CPU_ALLOCATOR_USE_BFC."""
    code = (
        "from mnist_lstm.runtime import tf\n"
        "tf.ones((512, 512)) @ tf.ones((512, 512))\n"
        "try:\n"
        "    print(tf.config.experimental.get_memory_info('CPU:0')['peak'])\n"
        "except ValueError as err:\n"
        "    print('no stats:', err)\n"
    )
    return fresh_process(code, {"TF_CPU_ALLOCATOR_USE_BFC": env_value}).stdout.strip()


def test_tensorflow_takes_cpu_tensors_from_its_bfc_pool_unless_the_user_says_otherwise():
    # TensorFlow keeps allocation statistics for the CPU only in its BFC allocator: a number here
    # means the variable runtime.py sets was honoured (a release that drops it fails this test,
    # and the train stage's peak memory would drift up again; docs/performance-engineering.md).
    peak = cpu_allocator_stats(None)
    assert peak.isdigit() and int(peak) >= 3 * 512 * 512 * 4, peak
    assert cpu_allocator_stats("false").startswith("no stats:")


def tensorflow_startup_log(onednn_opts: str | None) -> str:
    """TensorFlow's start-up log (C++ log level 0) in a fresh process that imports the package's
    TensorFlow; `onednn_opts` is the user's own TF_ENABLE_ONEDNN_OPTS (None: unset)."""
    code = "from mnist_lstm.runtime import tf\nprint(int(tf.constant(1) + 1))\n"
    user_env = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": onednn_opts}
    return fresh_process(code, user_env).stderr


def test_tensorflows_onednn_graph_rewrites_are_off_unless_the_user_turns_them_on():
    # TensorFlow announces its oneDNN rewrites at start-up; if a release stops reading
    # TF_ENABLE_ONEDNN_OPTS (or drops the rewrites), one of these two fails.
    assert "oneDNN custom operations are on" in tensorflow_startup_log("1")
    assert "oneDNN custom operations are on" not in tensorflow_startup_log(None)
