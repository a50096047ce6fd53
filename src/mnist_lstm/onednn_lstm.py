"""The LSTM's training loop as one fused oneDNN kernel per direction, for TensorFlow on the CPU.

Keras' LSTM on the CPU runs each of the 28 timesteps as some 40 small TensorFlow ops, forward and
backward: dispatching them costs more than their arithmetic. `csrc/onednn_lstm.cc` wraps oneDNN's
LSTM primitive (the kernel PyTorch's CPU LSTM uses) as two TensorFlow ops, the forward pass over
the whole sequence and its gradient. `use_onednn(model)` routes a model's LSTM layers through them.

The layers stay `keras.layers.LSTM` with the same weights, initialisation and config: the saved
model is a plain Keras model that loads and predicts anywhere, without this library. The op is
optional: `onednn_build` says whether it can exist here and builds it (`make install` only);
`choose_kernel` decides per run whether training uses it (`train.lstm_kernel`).
"""

from __future__ import annotations

import functools
import types

from mnist_lstm import onednn_build
from mnist_lstm.errors import UserError, one_line
from mnist_lstm.runtime import keras, tf


def choose_kernel(requested: str) -> tuple[str, str]:
    """The LSTM kernel training uses for `train.lstm_kernel` (auto, onednn or keras), and why, in
    words for the stage's log.

    `auto` takes the fused op where `make install` built it from the current source and the model
    trains on a CPU; Keras' own LSTM otherwise (its cuDNN kernel on a GPU). `onednn` insists and
    fails in one line when it cannot have it. Neither compiles anything.
    """
    if requested == "keras":
        return "keras", "train.lstm_kernel: keras"
    gpus = tf.config.list_logical_devices("GPU")
    try:
        if gpus:
            raise onednn_build.OpUnavailable(
                f"{len(gpus)} GPU(s) visible and the op runs on the CPU only "
                "(CUDA_VISIBLE_DEVICES=-1 hides them)"
            )
        ops()
    except onednn_build.OpUnavailable as err:
        if requested == "onednn":
            raise onednn_build.OpUnavailable(
                f"train.lstm_kernel: onednn, but {err} (or set train.lstm_kernel: auto)"
            ) from None
        why = "Keras' cuDNN kernel on the GPU" if gpus else onednn_build.COST
        return "keras", f"train.lstm_kernel: auto, and the oneDNN op is unusable: {err}; {why}"
    return "onednn", f"train.lstm_kernel: {requested}; the fused oneDNN op, built from this source"


@functools.cache
def ops() -> types.ModuleType:
    """The op library, checked to be built from the current source: never an old binary for a new
    source, and never a compile (a missing or stale library is OpUnavailable; `make install`
    builds it)."""
    path = onednn_build.current_library()
    try:
        return tf.load_op_library(str(path))
    except (tf.errors.NotFoundError, OSError) as err:
        # Built from this source but against another TensorFlow (the lock changed since).
        raise onednn_build.OpUnavailable(
            f"{path} does not load ({one_line(err)}); `make install` rebuilds it"
        ) from None


@tf.RegisterGradient("OnednnLstm")
def _onednn_lstm_grad(op: tf.Operation, d_outputs, d_h, d_c, _d_workspace) -> list:
    if not op.get_attr("training"):
        raise ValueError(
            "the oneDNN LSTM ran in inference mode (training=False), which keeps nothing for the "
            "gradient: call the layer with training=True to differentiate it"
        )
    # Gradients of outputs nothing used arrive as None; the kernel wants zeros.
    d_outputs, d_h, d_c = (
        tf.zeros_like(out) if grad is None else grad
        for grad, out in zip((d_outputs, d_h, d_c), op.outputs[:3])
    )
    shards = op.get_attr("shards")
    return list(ops().onednn_lstm_grad(*op.inputs, *op.outputs, d_outputs, d_h, d_c, shards=shards))


def lstm(
    sequences: tf.Tensor,
    initial_state: list[tf.Tensor],
    cell: keras.layers.LSTMCell,
    go_backwards: bool = False,
    training: bool = True,
) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
    """Keras' RNN inner loop contract: (last output, all outputs, [h, c]). `training=False` keeps
    nothing for a gradient (validation and predict)."""
    if go_backwards:
        sequences = tf.reverse(sequences, axis=[1])
    outputs, h, c, _ = ops().onednn_lstm(
        sequences,
        initial_state[0],
        initial_state[1],
        cell.kernel.value,
        cell.recurrent_kernel.value,
        cell.bias.value,
        training=training,
    )
    return h, outputs, [h, c]


def supported(layer: keras.layers.LSTM) -> str | None:
    """Why the fused kernel cannot stand in for `layer`, or None when it can."""
    cell = layer.cell
    if cell.activation is not keras.activations.tanh:
        return "activation is not tanh"
    if cell.recurrent_activation is not keras.activations.sigmoid:
        return "recurrent_activation is not sigmoid"
    if not cell.use_bias:
        return "use_bias is False"
    if cell.dropout or cell.recurrent_dropout:
        return "it has dropout inside the cell"
    if layer.stateful:
        return "it is stateful"
    return None


def use_onednn(model: keras.Model) -> int:
    """Route every LSTM layer of `model` (also inside Bidirectional) through the fused kernel;
    how many were routed. Masked input falls back to Keras' own loop at call time."""
    ops()  # fail before training, not inside the first traced step
    routed = 0
    for layer in _lstm_layers(model):
        reason = supported(layer)
        if reason:
            raise UserError(f"LSTM layer {layer.name!r} cannot use the oneDNN kernel: {reason}")
        layer.inner_loop = types.MethodType(_fused_inner_loop, layer)
        routed += 1
    return routed


def _fused_inner_loop(self, sequences, initial_state, mask, training=False):
    if mask is not None or sequences.dtype != tf.float32:
        return keras.layers.LSTM.inner_loop(self, sequences, initial_state, mask, training)
    # Keras passes a Python bool; anything else (a tensor) is treated as training.
    return lstm(
        sequences, initial_state, self.cell, self.go_backwards, training=training is not False
    )


def _lstm_layers(model: keras.Model) -> list[keras.layers.LSTM]:
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            found += [layer.forward_layer, layer.backward_layer]
        elif isinstance(layer, keras.layers.LSTM):
            found.append(layer)
    return found
