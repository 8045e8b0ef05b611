"""The Keras half of ``gradwatch demo``: the same story with SimpleRNN, LSTM and GRU
trained by ``model.fit`` under ``GradWatchCallback``.

Same task and data generator as the PyTorch demo. Keras' own conventions differ in two
places that matter here: an LSTM has one bias per gate and ``unit_forget_bias=True``
(forget-gate bias 1) by default; a GRU keeps memory when its update gate z is near 1,
as in PyTorch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gradwatch.cli.demo._progress import Progress
from gradwatch.cli.demo.torch_demo import RunResult, RunSpec, _train_echoing

__all__ = ["RUNS", "train_all"]

RUNS: tuple[RunSpec, ...] = (
    RunSpec("rnn_tanh", "tanh", 64, 1e-3, None, "keras SimpleRNN (tanh), default init, Adam"),
    RunSpec(
        "lstm",
        "lstm",
        64,
        1e-3,
        None,
        "keras LSTM, forget-gate bias 2 (unit_forget_bias adds 1; we use 2 as in the PyTorch demo), Adam",
    ),
    RunSpec("gru", "gru", 32, 3e-3, None, "keras GRU, update-gate bias 4, Adam"),
    RunSpec("relu_rnn", "relu", 64, 3e-3, None, "keras SimpleRNN (ReLU), recurrent kernel 1.1*I, Adam, no clipping"),
    RunSpec(
        "relu_sgd",
        "relu",
        64,
        1e-2,
        None,
        "keras SimpleRNN (ReLU), recurrent kernel 1.1*I, 30 steps, SGD momentum 0.9, no clipping",
        30,
        "sgd",
    ),
    RunSpec("relu_sgd_fixed", "relu", 64, 1e-2, "fixed", "the same, same seed, policy='fixed' (max_norm=1)", 30, "sgd"),
)

BATCH = 32
EVAL_SIZE = 512


def _gate_bias(units: int, gate: int, n_gates: int, value: float, rows: int | None = None) -> Any:
    """A bias initializer: ``value`` on one gate block, zeros elsewhere."""

    def init(shape: Any, dtype: Any = None) -> Any:
        b = np.zeros(shape, dtype="float32")
        b[..., gate * units : (gate + 1) * units] = value
        return b

    return init


def _build(spec: RunSpec) -> Any:
    import keras

    h = spec.hidden
    if spec.cell == "lstm":  # Keras gate order i, f, c, o
        rnn = keras.layers.LSTM(h, unit_forget_bias=False, bias_initializer=_gate_bias(h, 1, 4, 2.0), name="rnn")
    elif spec.cell == "gru":  # gate order z, r, h; bias (2, 3h) with reset_after: 2 + 2 on z
        rnn = keras.layers.GRU(h, bias_initializer=_gate_bias(h, 0, 3, 2.0), name="rnn")
    elif spec.cell == "relu":
        rnn = keras.layers.SimpleRNN(
            h, activation="relu", recurrent_initializer=keras.initializers.Identity(1.1), name="rnn"
        )
    else:
        rnn = keras.layers.SimpleRNN(h, name="rnn")
    model = keras.Sequential(
        [keras.Input((spec.length, 1)), rnn, keras.layers.Dense(1, name="head")], name=spec.name
    )
    opt = keras.optimizers.SGD(spec.lr, momentum=0.9) if spec.optimizer == "sgd" else keras.optimizers.Adam(spec.lr)
    model.compile(opt, keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def train_one(spec: RunSpec, out: Path, steps: int, seed: int = 0, stream: TextIO | None = None) -> RunResult:
    import keras

    from gradwatch_tf import GradWatchCallback

    keras.utils.set_random_seed(seed)
    task = spec.task
    rng = np.random.default_rng(seed)
    x, y = task.batch(rng, steps * BATCH)  # one epoch of `steps` batches
    model = _build(spec)
    path = spec.run_file(out)
    watch = GradWatchCallback(**spec.watch_options(out, steps))
    watch.monitor.meta["demo"] = {
        "description": spec.description,
        "hidden": spec.hidden,
        "lr": spec.lr,
        "length": spec.length,
        "optimizer": spec.optimizer,
    }
    bar = Progress(spec.name, steps, stream)

    class ShowProgress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            logs = logs or {}
            loss, norm = float(logs.get("loss", math.nan)), logs.get("grad_norm")
            info = f"loss {loss:.3f}" + (f"  |g| {float(norm):.2e}" if norm is not None else "")
            bar.update(batch + 1, info)

    start = time.perf_counter()
    try:
        hist = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watch, ShowProgress()])
    finally:
        watch.close()
    seconds = time.perf_counter() - start
    xe, ye = task.batch(np.random.default_rng(10_000 + seed), EVAL_SIZE)
    logits = np.asarray(model(xe, training=False)).reshape(-1)
    accuracy = float(np.mean((logits > 0) == (ye > 0.5)))
    bar.close(f"accuracy {accuracy:.2f}")
    return RunResult(spec, path, accuracy, float(hist.history["loss"][-1]), seconds)


def train_all(out: Path, steps: int, seed: int = 0, stream: TextIO | None = None) -> list[RunResult]:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ chatter (graph-optimizer notes)
    import tensorflow as tf

    try:  # small models: one thread is fastest (possible only before TF starts its pools)
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    return [_train_echoing(train_one, spec, out, steps, seed, stream) for spec in RUNS]
