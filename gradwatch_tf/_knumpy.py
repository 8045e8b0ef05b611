"""The ``keras.ops`` replay (:mod:`gradwatch_tf._kreplay`, :mod:`gradwatch_tf._kcells`)
run on numpy, on the host: the through-time profile of a ``fit`` whose compiled replay is
not ready.

Why: on TensorFlow and JAX the host replays what the train step kept with a compiled
function (:mod:`gradwatch_tf._tfhost`, :mod:`gradwatch_tf._kkept`). Compiling it takes
0.5-2 s of CPU, once: more than a short ``fit`` lasts (a demonstration, a quick
experiment, a benchmark's first fit), which had either to wait for it (2.7x the unwatched
first fit of a small LSTM on TensorFlow, 3.65x on JAX) or end without any propagation
measured. The same replay on numpy needs no compile: 8-20 ms per profiled step for a small
layer (an exact LSTM(8) over 30 steps, an estimated LSTM(64) over 50: a Python loop over the
steps of small matrix products). So a short fit
replays on numpy and compiles nothing; a long one compiles in the background and replays
on numpy until the compile is ready, so no profiled step goes unmeasured.

How: :data:`ops` is what the replay's modules call ``ops``: ``keras.ops``, except inside
:func:`on_numpy` (in this thread only: a background thread may be tracing the compiled
replay at the same time), where it is :class:`NumpyOps`, numpy functions with the
``keras.ops`` signatures the replay uses. The cells' weights come in through a
``keras.StatelessScope`` as in the compiled replay. Exactly the same code runs both ways:
the numbers agree to float32 rounding, except the random directions of an estimate
(dim s > 16), which numpy draws from its own generator (the estimate's accuracy does not
depend on which draws).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from gradwatch.through_time.fit import aggregate_logs
from gradwatch.through_time.ops import NUMPY_TENSORS

__all__ = ["NumpyOps", "backend", "on_numpy", "ops", "replay", "replayable"]

_LOCAL = threading.local()


def _numpy_now() -> bool:
    return bool(getattr(_LOCAL, "numpy", False))


@contextmanager
def on_numpy() -> Iterator[None]:
    """Inside: the replay's :data:`ops` are numpy's, in this thread."""
    before = _numpy_now()
    _LOCAL.numpy = True
    try:
        yield
    finally:
        _LOCAL.numpy = before


def backend() -> str:
    """The backend the replay's ops run on now: ``"numpy"`` inside :func:`on_numpy`, else
    Keras' own."""
    return "numpy" if _numpy_now() else str(keras.backend.backend())


def _tree_map(f: Callable[..., Any], *trees: Any) -> Any:
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, (list, tuple)):
        return type(first)(_tree_map(f, *parts) for parts in zip(*trees))
    return f(*trees)


class NumpyOps:
    """The ``keras.ops`` functions the replay calls, on numpy arrays, same signatures."""

    # numpy's own functions take the arguments the replay passes (keras.ops' names and
    # order: axis / axes / keepdims as keywords or in place)
    matmul = staticmethod(np.matmul)
    zeros_like = staticmethod(np.zeros_like)
    ones_like = staticmethod(np.ones_like)
    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)
    logical_and = staticmethod(np.logical_and)
    isfinite = staticmethod(np.isfinite)
    tanh = staticmethod(np.tanh)
    sqrt = staticmethod(np.sqrt)
    diagonal = staticmethod(np.diagonal)
    transpose = staticmethod(np.transpose)
    concatenate = staticmethod(np.concatenate)
    stack = staticmethod(np.stack)
    split = staticmethod(np.split)
    sum = staticmethod(np.sum)
    mean = staticmethod(np.mean)
    max = staticmethod(np.max)
    all = staticmethod(np.all)
    flip = staticmethod(np.flip)

    @staticmethod
    def log(x: Any) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)

    @staticmethod
    def sigmoid(x: Any) -> np.ndarray:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-x))

    @staticmethod
    def relu(x: Any) -> np.ndarray:
        return np.maximum(x, 0)

    @staticmethod
    def cast(x: Any, dtype: Any) -> np.ndarray:
        return np.asarray(x).astype(keras.backend.standardize_dtype(dtype), copy=False)

    @staticmethod
    def convert_to_tensor(x: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(x, dtype=None if dtype is None else keras.backend.standardize_dtype(dtype))

    @staticmethod
    def convert_to_numpy(x: Any) -> np.ndarray:
        return np.asarray(x)

    @staticmethod
    def stop_gradient(x: Any) -> np.ndarray:
        return np.asarray(x)

    @staticmethod
    def shape(x: Any) -> tuple[int, ...]:
        return tuple(np.shape(x))

    @staticmethod
    def arange(start: Any, stop: Any = None, step: int = 1, dtype: Any = None) -> np.ndarray:
        dt = None if dtype is None else keras.backend.standardize_dtype(dtype)
        return np.arange(start, dtype=dt) if stop is None else np.arange(start, stop, step, dtype=dt)

    @staticmethod
    def eye(n: int, m: int | None = None, k: int = 0, dtype: Any = None) -> np.ndarray:
        return np.eye(n, m, k, dtype=keras.backend.standardize_dtype(dtype or "float32"))

    @staticmethod
    def qr(x: Any, mode: str = "reduced") -> tuple[np.ndarray, np.ndarray]:
        q, r = np.linalg.qr(x, mode=mode)
        return q, r

    @staticmethod
    def eigh(x: Any) -> tuple[np.ndarray, np.ndarray]:
        w, v = np.linalg.eigh(x)
        return w, v

    @staticmethod
    def scan(f: Callable[[Any, Any], Any], init: Any, xs: Any, length: int | None = None, reverse: bool = False) -> Any:
        """``jax.lax.scan``'s contract: ``f(carry, x) -> (carry, y)`` over the leading axis
        of every array of ``xs``; the ys stacked in the order of ``xs`` (also reversed)."""
        flat = list(xs) if isinstance(xs, (list, tuple)) else [xs]
        n = int(np.shape(flat[0])[0]) if length is None else int(length)
        order = range(n - 1, -1, -1) if reverse else range(n)
        carry, ys = init, [None] * n
        for i in order:
            at = type(xs)(v[i] for v in flat) if isinstance(xs, (list, tuple)) else xs[i]
            carry, ys[i] = f(carry, at)
        if n == 0 or ys[0] is None:
            return carry, None
        return carry, _tree_map(lambda *steps: np.stack(steps), *ys)

    @staticmethod
    def fori_loop(lower: int, upper: int, body: Callable[[int, Any], Any], init: Any) -> Any:
        value = init
        for i in range(int(lower), int(upper)):
            value = body(i, value)
        return value


_NUMPY = NumpyOps()


class _ReplayOps:
    """``keras.ops``, or :class:`NumpyOps` inside :func:`on_numpy` (this thread)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_NUMPY if _numpy_now() else keras.ops, name)


#: What the replay's modules call ``ops``.
ops = _ReplayOps()


def replayable(directions: list[tuple[str, Any]]) -> bool:
    """Every cell of ``directions`` ((key, RNN layer) pairs) can be replayed on numpy:
    its activations have closed forms (an activation differentiated by TensorFlow's
    autodiff cannot run there)."""
    from gradwatch_tf import _kcells

    with on_numpy():
        return all(_kcells.supported(layer.cell, False) for _, layer in directions)


def replay(
    directions: list[tuple[str, Any]],
    x: Any,
    mask: Any,
    states: list[list[Any] | None],
    drops: list[tuple[Any, Any] | None],
    weights: list[tuple[Any, Any]],
    *,
    step: int,
    salt: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The replay of one recurrent layer (its ``directions``) on numpy: log gains and log
    max gains [2, R, T] (float64, the engine's rule over the sequences) and the keep
    gate's statistics [2] of the direction whose memory path closes most (None for a cell
    without a keep gate). ``x`` [P, T, F], ``mask`` [P, T], ``states`` and ``drops`` per
    direction (None: zeros / no dropout), ``weights`` (variable, value) pairs: the values
    the kept step's forward used. An estimate's random directions are seeded from (step,
    salt) as the compiled replays' are, but drawn by numpy's own generator."""
    from gradwatch_tf import _kreplay

    logs, gates = [], []
    with keras.StatelessScope(state_mapping=weights), on_numpy():
        for i, (_, layer) in enumerate(directions):
            per_seq, gate = _kreplay.measure(
                layer.cell,
                np.asarray(x, np.float32),
                None if mask is None else np.asarray(mask, np.float32),
                None if states[i] is None else [np.asarray(s, np.float32) for s in states[i]],  # type: ignore[union-attr]
                backwards=bool(getattr(layer, "go_backwards", False)),
                seed=np.int64(step) * 4099 + (int(salt) * 16 + i),
                dropout=drops[i],
            )
            logs.append(
                np.stack(
                    aggregate_logs(
                        np.asarray(per_seq[0], np.float64), np.asarray(per_seq[1], np.float64), NUMPY_TENSORS
                    )
                )
            )
            gates.append(None if gate is None else np.asarray(gate, np.float64))
    out = np.transpose(np.stack(logs), (1, 0, 2))  # [2, R, T]
    if any(g is None for g in gates):
        return out, None
    per = np.stack(gates)  # type: ignore[arg-type]
    return out, per[int(np.argmin(per[:, 1]))]
