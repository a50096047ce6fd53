#!/usr/bin/env bash
# The GPU figures in docs/performance.md, in one run on a machine with an NVIDIA GPU, CUDA builds of PyTorch and
# JAX, and no TensorFlow (so the train stage itself cannot run there; Keras 3 runs the same model on
# JAX). Expects the raw data as .gpu/mnist.npz and, if Keras is not installed, its wheels in .whl/.
# Writes JSON lines to ${OUT:-.gpu}/gpu.jsonl.
set -euo pipefail
out=${OUT:-.gpu}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, jax; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
for round in 1 2; do
    python3 bench/torch_lstm.py --data .gpu/mnist.npz --device cuda | tee -a "$out/gpu.jsonl"
    KERAS_BACKEND=jax python3 bench/keras_backend.py --data .gpu/mnist.npz | tee -a "$out/gpu.jsonl"
done
python3 bench/torch_lstm.py --data .gpu/mnist.npz --device cpu --epochs 3 | tee -a "$out/gpu.jsonl"
