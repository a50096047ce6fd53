from __future__ import annotations

import platform
import subprocess
import sys

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
