"""On JAX, what a jitted ``fit`` step keeps for the host's through-time replay, and how
the host compiles that replay (the pool and the switch serve TensorFlow's ``fit`` too:
:mod:`gradwatch_tf._tfhost`) (:mod:`gradwatch_tf._ksites`, which says why: the replay's
scans are kept out of the train step's compile)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from gradwatch.through_time.plan import PROBED
from gradwatch_tf import _kcells

__all__ = ["BACKGROUND_COMPILE", "BACKGROUND_MIN_STEPS", "Kept", "compiles_done", "run"]

#: In ``fit`` on JAX and TensorFlow, compile (trace) the host's replay and spectral
#: functions in a background thread (one per process, idle when done): the first ``fit``
#: is not held for it; profiled steps read before it is ready are recorded without
#: propagation (not measured). False: compile at the first profiled step, waiting for it.
BACKGROUND_COMPILE = True
#: A ``fit`` (JAX or TensorFlow) with fewer steps left than this when a profiled step is
#: read waits for the host profile's compile (trace) rather than leaving that step
#: unmeasured: it takes 0.5-2 s, longer than such a fit may last, and a short run (a
#: demonstration, a quick experiment) would end without any propagation measured.
BACKGROUND_MIN_STEPS = 100
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradwatch-compile")
    return _POOL


def compiles_done() -> None:
    """Wait until every background compile started so far is ready (one worker, in
    order: a no-op queued behind them)."""
    _pool().submit(lambda: None).result()


def run(compiled: dict[Any, Any], key: Any, fn: Any, args: tuple[Any, ...], *, wait: bool = False) -> Any:
    """``fn(*args)`` (a ``jax.jit`` function) through its executable compiled once per
    ``key`` and kept in ``compiled``; with :data:`BACKGROUND_COMPILE` the compile runs in
    the pool's thread and this returns None until it is ready (a failed compile raises),
    unless ``wait`` (a short fit): then it compiles now, or waits for the compile under way."""
    if key not in compiled:
        if BACKGROUND_COMPILE and not wait:
            import jax

            # Shapes only: the arrays themselves may be donated to the next train step.
            specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
            compiled[key] = _pool().submit(lambda: fn.lower(*specs).compile())
        else:
            compiled[key] = fn.lower(*args).compile()
    entry = compiled[key]
    if isinstance(entry, Future):
        if not entry.done() and not wait:
            return None
        entry = compiled[key] = entry.result()
    return entry(*args)


@dataclass
class Kept:
    """What the host replay of a due step needs, kept on the device by the jitted step
    (Keras variables in the optimizer's state, like the ring): the first ``PROBED``
    sequences of the input [P, T, F] and mask [P, T] (padded; ``n`` of them valid), the
    initial state parts [P, u] (zeros when the call had none: the replay's own default)
    and the step they belong to (0: none), and the cells' weights before the update of the
    last profiled step (``wstep``; the spectral norms, and the replay's weights when
    ``step`` is that step too)."""

    x: Any
    mask: Any
    states: list[Any]
    weights: list[Any]
    n: Any
    step: Any
    wstep: Any  # the step whose weights ``weights`` hold (kept on every profiled step)
    #: Per direction: (input, recurrent) dropout masks [P, F] / [P, u] of the call, each
    #: None (no such dropout), a variable, or a list of one per gate (``dropout_mask_count``)
    drops: list[tuple[Any, Any]] = field(default_factory=list)

    @staticmethod
    def make(salt: int, length: int, directions: list[tuple[str, Any]], make: Callable[[Any, str, str], Any]) -> Kept:
        """The buffers of one site (``directions``: its (key, RNN layer) pairs)."""
        tag = f"gradwatch_kept_{salt}"
        cell = directions[0][1].cell
        feat = int(cell.kernel.shape[0])
        parts = _kcells.KCELLS[type(cell).__name__](cell).parts
        states = [
            make(np.zeros((PROBED, int(layer.cell.units))), "float32", f"{tag}_s{i}_{p}")
            for i, (_, layer) in enumerate(directions)
            for p in range(parts)
        ]
        weights = [
            make(np.zeros(tuple(v.shape)), keras.backend.standardize_dtype(v.dtype), f"{tag}_w{j}")
            for j, v in enumerate(v for _, layer in directions for v in layer.cell.weights)
        ]

        def masks(cell: Any, rate: Any, width: int, name: str) -> Any:
            """The buffers of one kind of dropout mask, as the cell hands them out: one,
            or one per gate (``dropout_mask_count``); None without that dropout."""
            if not float(rate or 0.0) > 0:
                return None
            count = getattr(cell, "dropout_mask_count", None)
            made = [make(np.ones((PROBED, width)), "float32", f"{name}_{g}") for g in range(int(count or 1))]
            return made if count is not None else made[0]

        drops = [
            (
                masks(layer.cell, getattr(layer.cell, "dropout", 0.0), feat, f"{tag}_d{i}_0"),
                masks(layer.cell, getattr(layer.cell, "recurrent_dropout", 0.0), int(layer.cell.units), f"{tag}_d{i}_1"),
            )
            for i, (_, layer) in enumerate(directions)
        ]
        return Kept(
            drops=drops,
            x=make(np.zeros((PROBED, length, feat)), "float32", f"{tag}_x"),
            mask=make(np.zeros((PROBED, length)), "float32", f"{tag}_mask"),
            states=states,
            weights=weights,
            n=make(0, "int32", f"{tag}_n"),
            step=make(0, "int32", f"{tag}_step"),
            wstep=make(0, "int32", f"{tag}_wstep"),
        )
