"""On JAX, what a jitted ``fit`` step keeps for the host's through-time replay, and how
the host compiles that replay (the pool and the switch serve TensorFlow's ``fit`` too:
:mod:`gradwatch_tf._tfhost`) (:mod:`gradwatch_tf._ksites`, which says why: the replay's
scans are kept out of the train step's compile)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from keras import ops

from gradwatch.options import profiled_ordinal
from gradwatch.through_time.plan import PROBED
from gradwatch_tf import _kcells

logger = logging.getLogger("gradwatch")

__all__ = [
    "BACKGROUND_COMPILE",
    "BACKGROUND_MIN_STEPS",
    "KEPT_BYTES",
    "NUMPY_RENT_S",
    "Kept",
    "KeptHost",
    "compiles_done",
    "host_run",
    "run",
    "short_fit",
    "slot_bytes",
    "slots_for",
]

#: The most bytes a watch's kept copies take on the device, all slots together (TensorFlow's
#: and JAX's): one slot per profiled step an execution of ``steps_per_execution`` steps can
#: hold, each with a copy of the recurrent cells' weights, is fewer slots where it would
#: take more (an LSTM(1024) at ``steps_per_execution=100``: 11 copies of 33 MB). A profiled
#: step whose slot a later one of the same execution took is then not measured (left out).
KEPT_BYTES = 256 << 20


def slot_bytes(length: int, directions: list[tuple[str, Any]]) -> int:
    """Bytes one slot of a site's kept buffers takes: its cells' weights, the probed
    sequences' input and mask, their initial states (4 bytes a number)."""
    cell = directions[0][1].cell
    feat = int(cell.kernel.shape[0])
    numbers = PROBED * length * (feat + 1)
    for _, layer in directions:
        numbers += sum(int(np.prod(v.shape)) for v in layer.cell.weights)
        numbers += PROBED * int(layer.cell.units) * _kcells.KCELLS[type(layer.cell).__name__].parts
    return 4 * numbers


def slots_for(per_execution: int, every: int, per_slot: int) -> int:
    """The slots of a watch's kept buffers: one per profiled step an execution of
    ``per_execution`` steps can hold (step 1 and every ``every``-th: at most
    ``per_execution // every + 1``), fewer when ``per_slot`` bytes each would pass
    :data:`KEPT_BYTES` (an INFO line then says so); at least one."""
    n, every = max(int(per_execution), 1), max(int(every), 1)
    wanted = min(n, n // every + 1)
    slots = wanted if per_slot <= 0 else max(1, min(wanted, KEPT_BYTES // per_slot))
    if slots < wanted:
        logger.info(
            "gradwatch: %d of the %d profiled steps an execution can hold keep their inputs and weights for the "
            "through-time replay (the copies would pass %d MB); the others' propagation is left out.",
            slots, wanted, KEPT_BYTES >> 20,
        )
    return slots

#: In ``fit`` on JAX and TensorFlow, compile (trace) the host's replay function in a
#: background thread (one per process, idle when done): the fit is not held for it, and
#: profiled steps read before it is ready are replayed on numpy (:mod:`gradwatch_tf._knumpy`;
#: a cell numpy cannot replay: not measured). False: compile at the first profiled step,
#: waiting for it, and never replay on numpy.
BACKGROUND_COMPILE = True
#: A ``fit`` (JAX or TensorFlow) with fewer steps left than this when a profiled step is
#: read compiles nothing: it replays on numpy (the compile takes 0.5-2 s of CPU, more
#: than such a fit may last: a demonstration, a quick experiment, a first fit); a cell
#: numpy cannot replay waits for the compile instead, rather than end the fit without any
#: propagation measured. A longer fit starts the compile in the background.
BACKGROUND_MIN_STEPS = 100
#: Rent or buy: short fits that have spent this long (seconds) replaying one layer on numpy
#: start its compile in the background anyway (about what the compile costs; many short
#: fits in a row, a tuner or a loop of ``fit`` calls, would otherwise replay on numpy for
#: ever, a few times slower per replay than compiled).
NUMPY_RENT_S = 1.0
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


def short_fit(steps_left: int | None) -> bool:
    """A fit with this many steps left (None: unknown) is too short to compile for."""
    return steps_left is not None and steps_left < BACKGROUND_MIN_STEPS


def host_run(
    compiled: dict[Any, Any],
    key: Any,
    *,
    compile_now: Callable[[], Any],
    compile_later: Callable[[], Callable[[], Any]],
    call: Callable[[Any], Any],
    steps_left: int | None,
    fallback: Callable[[], Any] | None,
    rent: dict[Any, float],
) -> Any:
    """The host's replay of a profiled step: ``call(executable)`` through the executable
    compiled once per ``key`` (kept in ``compiled``) when it is ready, else ``fallback()``
    (the numpy replay; None where it cannot run), else None (not measured).

    ``compile_now()`` compiles in this thread; ``compile_later()`` returns the function the
    background thread runs to compile (made here: it may capture the arguments' shapes).
    With :data:`BACKGROUND_COMPILE` a fit of at least :data:`BACKGROUND_MIN_STEPS` steps
    left starts the compile in the background and replays on numpy meanwhile; a shorter fit
    compiles nothing and replays on numpy (until ``rent[key]``, the seconds its numpy
    replays took, reaches :data:`NUMPY_RENT_S`), or, with no fallback, waits for the compile.
    """
    short = short_fit(steps_left)
    if key not in compiled:
        if not BACKGROUND_COMPILE:
            compiled[key] = compile_now()
        elif short and fallback is not None and rent.get(key, 0.0) < NUMPY_RENT_S:
            t0 = time.perf_counter()
            try:
                return fallback()
            finally:
                rent[key] = rent.get(key, 0.0) + time.perf_counter() - t0
        elif short and fallback is None:
            compiled[key] = compile_now()
        else:
            compiled[key] = _pool().submit(compile_later())
    entry = compiled[key]
    if isinstance(entry, Future):
        if not entry.done():
            if fallback is not None:
                return fallback()
            if not short:
                return None
        entry = compiled[key] = entry.result()
    return call(entry)


def run(
    compiled: dict[Any, Any],
    key: Any,
    fn: Any,
    args: tuple[Any, ...],
    *,
    steps_left: int | None = None,
    fallback: Callable[[], Any] | None = None,
    rent: dict[Any, float] | None = None,
) -> Any:
    """``fn(*args)`` (a ``jax.jit`` function) through its executable compiled once per
    ``key`` (:func:`host_run`: in the background, numpy's ``fallback`` meanwhile)."""

    def later() -> Callable[[], Any]:
        import jax

        # Shapes only: the arrays themselves may be donated to the next train step.
        specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
        return lambda: fn.lower(*specs).compile()

    return host_run(
        compiled,
        key,
        compile_now=lambda: fn.lower(*args).compile(),
        compile_later=later,
        call=lambda executable: executable(*args),
        steps_left=steps_left,
        fallback=fallback,
        rent={} if rent is None else rent,
    )


@dataclass(frozen=True)
class _Seg:
    """Where one kept value lives in a slot of :attr:`Kept.flat`."""

    offset: int
    shape: tuple[int, ...]
    dtype: Any  # the value's own dtype (numpy), restored on the host

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


#: The columns of :attr:`Kept.meta`.
_META = {"n": 0, "step": 1, "wstep": 2}


@dataclass
class Kept:
    """What the host replay of a due step needs, kept on the device by the jitted step
    (Keras variables in the optimizer's state, like the ring), in ``slots`` slots (with
    more than one, the leading axis K: one per profiled step one execution of
    ``steps_per_execution`` steps can hold, so the host, reading after the execution,
    finds each of them; with one, no such axis).

    Two variables, whatever the layer: ``flat`` [K, N] holds every float value of a slot
    end to end (the first ``PROBED`` sequences of the input [P, T, F] and mask [P, T],
    padded; the initial state parts [P, u], zeros when the call had none: the replay's
    own default; the call's dropout masks; the cells' weights before the update of a
    profiled step), ``meta`` [K, 3] int32 the number ``n`` of valid sequences, the step
    they belong to (``step``, 0: none) and the step whose weights the slot holds
    (``wstep``; the spectral norms, and the replay's weights when ``step`` is that step
    too). One buffer, not one per value, because XLA compiles each variable the step
    writes into kernels of its own: the kept writes were ten of the ~40 kernels a watched
    LSTM added to JAX's compile of the train step (0.09 s of a first ``fit``'s 0.3 s).

    The step stages values (:meth:`stage`, each with its own condition) and writes them
    all at once (:meth:`commit`); the host takes one copy of both variables
    (:meth:`host`) and cuts the values from it. The names ``x``, ``mask``, ``states``,
    ``weights``, ``drops`` are the keys of those values (``drops``, per direction: the
    (input, recurrent) dropout masks, each None, a key, or a list of keys, one per gate:
    ``dropout_mask_count``)."""

    flat: Any
    meta: Any
    segs: dict[str, _Seg]
    states: list[str]
    weights: list[str]
    drops: list[tuple[Any, Any]] = field(default_factory=list)
    every: int = 1  # profile_every: the slot of a profiled step is its profiled ordinal modulo K
    x: str = "x"
    mask: str = "mask"
    #: This trace's staged values, key -> (value, condition) (see :meth:`stage`).
    staged: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        """K, the profiled steps the buffers hold at once."""
        return int(self.meta.shape[0]) if len(self.meta.shape) == 2 else 1

    def slot(self, step: Any) -> Any:
        """The slot of profiled step ``step`` in the jitted step: its profiled ordinal
        (:func:`gradwatch.options.profiled_ordinal`, as TensorFlow's buffers) modulo K,
        so the profiled steps of one execution get distinct slots (one slot: 0, no op)."""
        if self.slots == 1:
            return 0
        return ops.mod(profiled_ordinal(ops.cast(step, "int32"), self.every), self.slots)

    # ------------------------------------------------------------ in the jitted step
    def stage(self, key: str, value: Any, due: Any) -> None:
        """Keep ``value`` under ``key`` (one of :attr:`segs`, or ``n`` / ``step`` /
        ``wstep``) when ``due`` holds, at the next :meth:`commit`."""
        self.staged[key] = (value, due)

    def clear(self) -> None:
        """Forget what was staged (a trace that failed midway)."""
        self.staged = {}

    def commit(self, step: Any) -> None:
        """Write what was staged into step ``step``'s slot, in one write of each variable:
        ``where(due, new, old)`` element by element (no branch), ``due`` and ``new`` laid
        out value by value; values not staged keep what they held. (Elementwise in the
        old buffer, so XLA writes it in place; a concatenation of its slices compiled to
        a write elsewhere and a copy of the whole buffer back.) One slot: the whole
        buffer; several: a dynamic slice update of one slot (a step copies one slot, not K)."""
        staged, self.staged = self.staged, {}
        if not staged:
            return
        slot = self.slot(step)
        for buf, keys in ((self.flat, list(self.segs)), (self.meta, list(_META))):
            if not any(k in staged for k in keys):
                continue
            width = int(buf.shape[-1])
            old = buf.value if self.slots == 1 else ops.reshape(ops.slice(buf.value, [slot, 0], [1, width]), (width,))
            news, dues = [], []
            for k in keys:
                size = self.segs[k].size if buf is self.flat else 1
                value, due = staged.get(k, (None, False))
                news.append(
                    ops.zeros((size,), buf.dtype) if value is None else ops.reshape(ops.cast(value, buf.dtype), (size,))
                )
                dues.append(ops.broadcast_to(ops.convert_to_tensor(due, "bool"), (size,)))
            row = ops.where(ops.concatenate(dues, 0), ops.concatenate(news, 0), old)
            if self.slots == 1:
                buf.assign(row)
            else:
                buf.assign(ops.slice_update(buf.value, [slot, 0], ops.reshape(row, (1, width))))

    # ------------------------------------------------------------ on the host
    def host(self, read: Callable[[Any], Any]) -> KeptHost:
        """One host copy of both variables as read (a device array on JAX), to cut from."""
        flat, meta = np.asarray(read(self.flat)), np.asarray(read(self.meta))
        if self.slots == 1:
            flat, meta = flat[None], meta[None]
        return KeptHost(self, flat, meta.reshape(-1, len(_META)))

    @staticmethod
    def make(
        salt: int,
        length: int,
        directions: list[tuple[str, Any]],
        make: Callable[[Any, str, str], Any],
        slots: int = 1,
        every: int = 1,
    ) -> Kept:
        """The buffers of one site (``directions``: its (key, RNN layer) pairs), ``slots``
        of each; ``every``: the option ``profile_every``."""
        tag = f"gradwatch_kept_{salt}"
        k = max(int(slots), 1)
        lead = (k,) if k > 1 else ()  # (one slot: no slot axis)
        cell = directions[0][1].cell
        feat = int(cell.kernel.shape[0])
        parts = _kcells.KCELLS[type(cell).__name__].parts  # (the class: an instance transposes the kernel)
        segs: dict[str, _Seg] = {}
        f32 = np.dtype("float32")

        def add(key: str, shape: tuple[int, ...], dtype: Any = f32) -> str:
            offset = sum(s.size for s in segs.values())  # (end to end, in the order added)
            segs[key] = _Seg(offset, tuple(int(d) for d in shape), np.dtype(dtype))
            return key

        add("x", (PROBED, length, feat))
        add("mask", (PROBED, length))
        states = [
            add(f"s{i}_{p}", (PROBED, int(layer.cell.units)))
            for i, (_, layer) in enumerate(directions)
            for p in range(parts)
        ]
        weights = [
            add(f"w{j}", tuple(v.shape), np.dtype(v.value.dtype))
            for j, v in enumerate(v for _, layer in directions for v in layer.cell.weights)
        ]

        def masks(cell: Any, rate: Any, width: int, name: str) -> Any:
            """The keys of one kind of dropout mask, as the cell hands them out: one, or
            one per gate (``dropout_mask_count``); None without that dropout."""
            if not float(rate or 0.0) > 0:
                return None
            count = getattr(cell, "dropout_mask_count", None)
            made = [add(f"{name}_{g}", (PROBED, width)) for g in range(int(count or 1))]
            return made if count is not None else made[0]

        drops = [
            (
                masks(layer.cell, getattr(layer.cell, "dropout", 0.0), feat, f"d{i}_0"),
                masks(layer.cell, getattr(layer.cell, "recurrent_dropout", 0.0), int(layer.cell.units), f"d{i}_1"),
            )
            for i, (_, layer) in enumerate(directions)
        ]
        width = sum(s.size for s in segs.values())
        wide = "float64" if any(s.dtype == np.float64 for s in segs.values()) else "float32"
        return Kept(
            flat=make(np.zeros((*lead, width)), wide, f"{tag}_flat"),
            meta=make(np.zeros((*lead, len(_META))), "int32", f"{tag}_meta"),
            segs=segs,
            states=states,
            weights=weights,
            drops=drops,
            every=max(int(every), 1),
        )


@dataclass
class KeptHost:
    """A host copy of a site's kept buffers (:meth:`Kept.host`): ``flat`` [K, N],
    ``meta`` [K, 3], whatever the slot count."""

    kept: Kept
    flat: np.ndarray
    meta: np.ndarray

    def at(self, key: str, slot: int, rows: int | None = None) -> np.ndarray:
        """The value kept under ``key`` in ``slot``, in its own dtype and shape, its first
        ``rows`` rows when given."""
        seg = self.kept.segs[key]
        value = self.flat[slot, seg.offset : seg.offset + seg.size].reshape(seg.shape).astype(seg.dtype, copy=False)
        return value if rows is None else value[:rows]

    def number(self, key: str, slot: int) -> int:
        """``n``, ``step`` or ``wstep`` of ``slot``."""
        return int(self.meta[slot, _META[key]])

    def held(self, step: int) -> int | None:
        """The slot holding profiled step ``step``'s inputs and weights, else None (a step
        not due for the replay, or one overwritten before the host read)."""
        found = np.flatnonzero((self.meta[:, _META["step"]] == step) & (self.meta[:, _META["wstep"]] == step))
        return int(found[0]) if found.size else None

    def wslot(self, step: int) -> int | None:
        """The slot holding profiled step ``step``'s weights, else None."""
        found = np.flatnonzero(self.meta[:, _META["wstep"]] == step)
        return int(found[0]) if found.size else None
