"""TensorFlow ``fit``: the through-time profile computed beside the train step, not in it.

Why: a ``tf.function`` is fixed when traced, and Keras traces its train step twice in the
first ``fit``; the replay's scans and the spectral power iterations traced into it made
the first fit of a small LSTM about 2.9x the unwatched one (1.0 s of replay and 0.4 s of
spectral trace and graph optimisation, out of 0.9 s unwatched). Here the train step only
*keeps*, on profiled steps, what the profile needs (a few assigns in a ``tf.cond``): the
first ``PROBED`` sequences of each recurrent layer's input, mask, initial states and
dropout masks, the cells' weights before the update, and the step they belong to. The
host measures when it reads a profiled step's row (:meth:`HostProfile.fill`), so that
step's record carries the profile with its own step number, as in the graph before:

* the spectral norms from the kept recurrent kernels, on numpy
  (:class:`gradwatch.through_time.spectral.HostSpectral`, as on JAX): nothing to trace;
* the replay (:func:`gradwatch_tf._propagation.site_logs`, the same ``keras.ops`` replay)
  in a ``tf.function`` of its own per layer, traced once in the background
  (:data:`gradwatch_tf._kkept.BACKGROUND_COMPILE`) when the fit is long enough
  (:data:`gradwatch_tf._kkept.BACKGROUND_MIN_STEPS`); until it is ready, and in a fit too
  short to trace it for, the same replay runs on numpy (:mod:`gradwatch_tf._knumpy`; a
  cell numpy cannot replay, with an activation only TensorFlow differentiates, waits
  for the trace in a short fit and goes unmeasured meanwhile in a long one, the next
  profiled step then replayed).

Used by the callback (``mode="callback"``), where the host reads every profiled step
(``read_due``). A custom loop (``gradwatch.watch``) keeps the in-graph replay: there a
traced step hands its row to the host from inside the graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradwatch.options import profiled_ordinal
from gradwatch.through_time.plan import PROBED
from gradwatch.through_time.spectral import HostSpectral
from gradwatch_tf import _kcells, _kkept, _knumpy

__all__ = ["HostProfile"]


@dataclass
class _SiteKept:
    """What the replay of one recurrent layer needs, kept by the train step; every
    buffer has one slot per profiled step an execution can hold (leading axis K)."""

    x: tf.Variable  # [K, P, T, F]
    mask: tf.Variable  # [K, P, T]
    n: tf.Variable  # [K] the valid rows (the batch may be under P)
    step: tf.Variable  # [K] the step the inputs belong to (0: none)
    due: tf.Variable  # [K] whether that step's replay is due by the cost model's period
    wstep: tf.Variable  # [K] the step the weights belong to
    states: list[list[tf.Variable]]  # per direction, its state parts [K, P, u]
    weights: list[list[tf.Variable]]  # per direction, the cell's weights [K, ...]
    #: Per direction: (input, recurrent) dropout masks, each None, a variable or a list
    #: of one per gate (the structure the call had: made at the first trace).
    drops: list[list[Any]] = field(default_factory=list)
    salt: int = 0  # the site's share of the replay's seeds (as in graph)
    key: int = 0  # id of the site
    #: Every dropout buffer made, by (direction, input 0 / recurrent 1, mask shapes).
    made: dict[tuple[Any, ...], list[tf.Variable]] = field(default_factory=dict)


class HostProfile:
    """Keeps in graph, replays and measures beside it (see the module docstring)."""

    def __init__(
        self,
        make: Callable[..., tf.Variable],
        fail: Callable[[str, BaseException], None],
        per_execution: int = 1,
        every: int = 1,
    ) -> None:
        """``per_execution``: the steps of one Keras execution (``steps_per_execution``);
        ``every``: the option ``profile_every``. The host reads after each execution with a
        profiled step, so each of its profiled steps keeps a slot of its own
        (:func:`gradwatch_tf._kkept.slots_for`; :meth:`prepare` caps them in bytes)."""
        self._make = make
        self._fail = fail
        self._per_execution, self._every = per_execution, every
        self.slots = _kkept.slots_for(per_execution, every, 0)
        self._kept: dict[int, _SiteKept] = {}  # id(site) -> buffers
        self._kernels: dict[int, tf.Variable] = {}  # id(block kernel) -> kept copy
        self._kernel_step: tf.Variable | None = None
        self._compiled: dict[Any, Any] = {}  # key -> concrete function, or its Future
        self.broken: set[str] = set()
        self._sites: list[Any] = []  # the sites :meth:`prepare` made buffers for
        self._rent: dict[Any, float] = {}  # key -> seconds of numpy replays (_kkept.NUMPY_RENT_S)
        #: The spectral norms, on the host from the kernels kept for the step (as on JAX):
        #: nothing to compile, and exact or within the contract's 1% (Lanczos, warm).
        self._spectral = HostSpectral()
        #: Sites whose last due replay could not run (its function was not ready): the
        #: next profiled step is replayed, so a run's first propagation is not a whole
        #: replay period late.
        self._owed: set[int] = set()
        #: Set by the callback before each read: the steps this ``fit`` has left after the
        #: one read (None: unknown, e.g. a dataset of unknown length).
        self.steps_left: int | None = None

    # ------------------------------------------------------------ in the train step
    def prepare(self, sites: list[Any], blocks: list[Any]) -> None:
        """Make every buffer whose shape is known now, outside any trace (a distribution
        strategy's replica context cannot make variables): each site's, a single dropout
        mask per direction where its cell has a dropout rate, and the kept kernels."""
        self._sites = list(sites)
        kept_sites = [s for s in sites if s.prop is not None and s.diag is None and s.length is not None and s.directions]
        if not self._kept and not self._kernels and kept_sites:  # (before any buffer is made)
            per_slot = sum(_kkept.slot_bytes(s.length, s.directions) for s in kept_sites)
            per_slot += 4 * sum(int(np.prod(b.kernel.shape)) for b in blocks)
            self.slots = _kkept.slots_for(self._per_execution, self._every, per_slot)
        for site in sites:
            # (a diagonal recurrence keeps nothing: the step measures it, _propagation)
            kept = self.ensure(site) if site.prop is not None and site.diag is None else None
            if kept is None:
                continue
            for i, (_, layer) in enumerate(site.directions):
                cell = layer.cell
                feat, units = int(cell.kernel.shape[0]), int(cell.units)
                for kind, (rate, width) in enumerate(
                    ((getattr(cell, "dropout", 0.0), feat), (getattr(cell, "recurrent_dropout", 0.0), units))
                ):
                    if 0.0 < float(rate or 0.0) < 1.0:
                        with tf.init_scope():
                            buf = self._make(
                                np.ones([self.slots, PROBED, width], np.float32), tf.float32, "gradwatch_kept_dropout"
                            )
                        kept.made[(i, kind, ((width,),))] = [buf]
                        kept.drops[i][kind] = buf  # the structure Keras' cells hand out
        if blocks:
            self._kernel_buffers(blocks)

    def _kernel_buffers(self, blocks: list[Any]) -> None:
        with tf.init_scope():
            for b in blocks:
                if id(b.kernel) not in self._kernels:
                    shape = [self.slots, *[int(d) for d in b.kernel.shape]]
                    self._kernels[id(b.kernel)] = self._make(
                        np.zeros(shape, np.float32), tf.float32, "gradwatch_kept_kernel"
                    )
            if self._kernel_step is None:
                self._kernel_step = self._make(np.zeros([self.slots], np.int64), tf.int64, "gradwatch_kept_kernel_step")

    def ensure(self, site: Any) -> _SiteKept | None:
        """The site's buffers, made once (outside any trace)."""
        kept = self._kept.get(id(site))
        if kept is not None or site.length is None or not site.directions:
            return kept
        k, tag = self.slots, f"gradwatch_kept_{site.name.replace('/', '_')}"

        def make(initial: Any, dtype: Any, name: str) -> tf.Variable:
            return self._make(np.zeros([k, *np.shape(initial)], np.asarray(initial).dtype), dtype, name)

        cell = site.directions[0][1].cell
        feat = int(cell.kernel.shape[0])
        with tf.init_scope():
            states = []
            for _, layer in site.directions:
                parts = _kcells.KCELLS[type(layer.cell).__name__].parts
                units = int(layer.cell.units)
                states.append(
                    [make(np.zeros([PROBED, units], np.float32), tf.float32, f"{tag}_s") for _ in range(parts)]
                )
            weights = [
                [make(np.zeros(v.shape, np.float32), tf.float32, f"{tag}_w") for v in layer.cell.weights]
                for _, layer in site.directions
            ]
            kept = _SiteKept(
                x=make(np.zeros([PROBED, site.length, feat], np.float32), tf.float32, f"{tag}_x"),
                mask=make(np.zeros([PROBED, site.length], np.float32), tf.float32, f"{tag}_mask"),
                n=make(np.int32(0), tf.int32, f"{tag}_n"),
                step=make(np.int64(0), tf.int64, f"{tag}_step"),
                due=make(np.int32(0), tf.int32, f"{tag}_due"),
                wstep=make(np.int64(0), tf.int64, f"{tag}_wstep"),
                states=states,
                weights=weights,
                drops=[[None, None] for _ in site.directions],
                key=id(site),
            )
        self._kept[id(site)] = kept
        return kept

    def slot(self, step: tf.Tensor, every: int) -> tf.Tensor:
        """The slot of profiled step ``step`` (:func:`profiled_ordinal` modulo the
        slots): consecutive profiled steps, as many as one execution holds, get distinct
        slots."""
        return tf.cast(tf.math.floormod(tf.cast(profiled_ordinal(step, every), tf.int64), self.slots), tf.int32)

    def keep(
        self,
        site: Any,
        x: Any,
        mask: Any,
        states: list[Any],
        drops: list[Any],
        step: tf.Tensor,
        slot: tf.Tensor,
        replay_due: tf.Tensor,
        salt: int,
    ) -> tf.Tensor:
        """In the traced forward pass of a profiled step: the call's first sequences (its
        input ``x``, ``mask``, initial ``states`` and dropout masks ``drops`` per
        direction) and the cells' weights into the site's buffers at ``slot``, with
        ``replay_due`` (the cost model's period; the host may replay a step not due when
        the last due one could not be: :meth:`fill`)."""
        kept = self.ensure(site)
        if kept is None:
            return tf.constant(False)
        kept.salt = int(salt)
        x = tf.cast(tf.stop_gradient(x), tf.float32)[:PROBED]
        b = tf.shape(x)[0]

        def pad(v: Any) -> Any:
            return tf.pad(v, [[0, PROBED - b]] + [[0, 0]] * (len(v.shape) - 1))

        if mask is None:
            m = tf.ones(tf.shape(x)[:2], tf.float32)
        else:
            m = tf.cast(tf.stop_gradient(mask), tf.float32)
            if len(m.shape) == 3:
                m = m[:, :, 0]
            m = m[:PROBED]
        put = functools.partial(_put, slot=slot)
        writes = [put(kept.x, pad(x)), put(kept.mask, pad(m)), put(kept.n, b)]
        ok = True
        for i, (_, layer) in enumerate(site.directions):
            given = states[i]
            bufs = kept.states[i]
            if given is not None and len(given) != len(bufs):
                ok = False  # a state layout the buffers do not hold: not measured
                continue
            for j, buf in enumerate(bufs):
                value = (
                    tf.zeros([b, int(buf.shape[-1])], tf.float32)
                    if given is None
                    else tf.cast(tf.stop_gradient(given[j]), tf.float32)[:PROBED]
                )
                writes.append(put(buf, pad(value)))
            for buf, w in zip(kept.weights[i], layer.cell.weights):
                writes.append(put(buf, _kcells._weight(w)))
            for kind, d in enumerate(drops[i]):
                made = self._drop_buffers(kept, i, kind, d)
                if made is None:
                    ok = ok and d is None  # a mask the buffers cannot hold: not measured
                    continue
                for buf, value in zip(made, d if isinstance(d, (list, tuple)) else [d]):
                    writes.append(put(buf, pad(tf.cast(tf.stop_gradient(value), tf.float32)[:PROBED])))
        step = tf.cast(step, tf.int64)
        writes.append(put(kept.wstep, step))
        writes.append(put(kept.due, tf.cast(replay_due, tf.int32)))
        writes.append(put(kept.step, step if ok else tf.zeros_like(step)))  # 0: never replayed
        with tf.control_dependencies(writes):
            return tf.constant(True)

    def _drop_buffers(self, kept: _SiteKept, i: int, kind: int, d: Any) -> list[tf.Variable] | None:
        """The buffers of one dropout mask of this call (None: it has none, or they
        cannot be made here), and the structure the host's replay reads (``kept.drops``)."""
        if d is None:
            self._structure(kept, i, kind, None)
            return None
        values = list(d) if isinstance(d, (list, tuple)) else [d]
        shapes = tuple(tuple(int(x) for x in v.shape[1:]) for v in values)
        flat = kept.made.get((i, kind, shapes))
        if flat is None:
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                return None  # masks of a shape not made in advance: no variables here
            with tf.init_scope():
                flat = [
                    self._make(np.ones([self.slots, PROBED, *shape], np.float32), tf.float32, "gradwatch_kept_dropout")
                    for shape in shapes
                ]
            kept.made[(i, kind, shapes)] = flat
        self._structure(kept, i, kind, flat if isinstance(d, (list, tuple)) else flat[0])
        return flat

    def _structure(self, kept: _SiteKept, i: int, kind: int, value: Any) -> None:
        """Set the dropout structure the replay reads; a replay function traced for
        another one (at setup: :meth:`warm_up`) is traced again."""
        if kept.drops[i][kind] is not value:
            kept.drops[i][kind] = value
            self._compiled.pop(("replay", kept.key), None)

    def keep_kernels(self, blocks: list[Any], step: tf.Tensor, slot: tf.Tensor) -> tf.Tensor:
        """In the traced step of a profiled step: the recurrent kernels of the spectral
        blocks, before the update, and the step they belong to, at ``slot``."""
        kernels = {id(b.kernel): b.kernel for b in blocks}
        self._kernel_buffers(blocks)  # (made by prepare: a no-op)
        writes = [_put(self._kernels[key], _kcells._weight(k), slot) for key, k in kernels.items()]
        writes.append(_put(self._kernel_step, tf.cast(step, tf.int64), slot))
        with tf.control_dependencies(writes):
            return tf.constant(True)

    # ------------------------------------------------------------ on the host
    def fill(self, layout: Any, row: np.ndarray, sites: list[Any], blocks: list[Any]) -> np.ndarray:
        """At the read of a profiled step's row: the spectral norms of the kernels kept for
        this very step, and the replay of each site whose buffers hold this very step,
        written into the row (gains exponentiated, as the ring holds them). Anything not
        ready or not kept for this step stays NaN: not measured."""
        step_sl = layout.slice("step")
        if step_sl is None:
            return row
        step = int(row[step_sl][0])
        row = np.array(row, dtype=np.float64)
        if blocks and "spectral" not in self.broken and self._kernel_step is not None:
            try:
                slot = _slot_of(self._kernel_step, step)
                if slot is not None:
                    kernels = {key: np.asarray(v.numpy()[slot]) for key, v in self._kernels.items()}
                    for b in blocks:
                        sl = layout.slice("spectral", b.name)
                        if sl is not None:
                            row[sl] = self._spectral(b.name, kernels[id(b.kernel)][:, b.start : b.stop])
            except Exception as exc:  # noqa: BLE001 - measuring is optional
                self.broken.add("spectral")
                self._fail("spectral norms", exc)
        if "replay" in self.broken:
            return row
        for site in sites:
            kept = self._kept.get(id(site))
            if kept is None or site.prop is None:
                continue
            try:
                slot = _slot_of(kept.step, step)
                if slot is None or int(kept.wstep.numpy()[slot]) != step:
                    continue
                owed = id(site) in self._owed
                if not (owed or int(kept.due.numpy()[slot])):
                    continue
                out = self._replay(site, kept, slot)
                if out is None:  # not compiled yet: the next profiled step replays, due or not
                    self._owed.add(id(site))
                    continue
                self._owed.discard(id(site))
                logs, gate = np.asarray(out[0], np.float64), np.asarray(out[1], np.float64)
            except Exception as exc:  # noqa: BLE001 - measuring is optional
                self.broken.add("replay")
                self._fail("propagation replay", exc)
                return row
            for kind, value in (("propagation", np.exp(logs[0])), ("max_gains", np.exp(logs[1])), ("gates", gate)):
                sl = layout.slice(kind, site.name)
                if sl is not None:
                    row[sl] = value.reshape(-1)
        return row

    def _replay(self, site: Any, kept: _SiteKept, slot: int) -> Any:
        """The replay of ``slot`` (:func:`gradwatch_tf._kkept.host_run`): the site's
        compiled function when it is ready, else on numpy (:mod:`gradwatch_tf._knumpy`),
        else None; a short fit compiles nothing."""
        numpy_ok = _knumpy.replayable(site.directions)
        return _kkept.host_run(
            self._compiled,
            ("replay", id(site)),
            compile_now=lambda: self._replay_function(site, kept),
            compile_later=lambda: self._warm(self._replay_function(site, kept)),
            call=lambda fn: fn(tf.constant(slot, tf.int32)),
            steps_left=self.steps_left,
            fallback=functools.partial(self._numpy_replay, site, kept, slot) if numpy_ok else None,
            rent=self._rent,
        )

    @staticmethod
    def _warm(fn: Any, slot: int = 0) -> Callable[[], Any]:
        """What the background thread runs: trace ``fn`` and run it once on ``slot``
        (TensorFlow optimises a graph at its first run; the result is not a step's)."""
        at = tf.constant(slot, tf.int32)

        def warm() -> Any:
            fn(at)
            return fn

        return warm

    def warm_up(self) -> None:
        """Start tracing the replay functions of the prepared sites now, in the background,
        for a fit long enough to compile for (:data:`gradwatch_tf._kkept.BACKGROUND_COMPILE`,
        :data:`~gradwatch_tf._kkept.BACKGROUND_MIN_STEPS`; the callback calls this at the
        start of each ``fit``, once it has set :attr:`steps_left`): much of a first run is
        TensorFlow optimising the graph, which releases the interpreter, so it overlaps
        with Keras tracing the train step, and fewer profiled steps are replayed on numpy.
        The first slot is filled with the current weights and one zero sequence, so the
        warm-up runs on real shapes."""
        if not _kkept.BACKGROUND_COMPILE or _kkept.short_fit(self.steps_left):
            return
        for site in self._sites:
            kept = self._kept.get(id(site))
            key = ("replay", id(site))
            if kept is None or site.prop is None or key in self._compiled:
                continue
            for bufs, (_, layer) in zip(kept.weights, site.directions):
                for buf, w in zip(bufs, layer.cell.weights):
                    _put(buf, _kcells._weight(w), tf.constant(0))
            _put(kept.n, tf.constant(1, tf.int32), tf.constant(0))
            self._compiled[key] = _kkept._pool().submit(self._warm(self._replay_function(site, kept)))

    def _numpy_replay(self, site: Any, kept: _SiteKept, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`gradwatch_tf._knumpy.replay` of ``slot``'s buffers, read to the host."""
        n = int(kept.n.numpy()[slot])
        x, mask, states, drops, weights = _slot_inputs(
            site, kept, lambda v: np.asarray(v.numpy()[slot][:n]), lambda v: np.asarray(v.numpy()[slot])
        )
        logs, gate = _knumpy.replay(
            site.directions, x, mask, states, drops, weights, step=int(kept.step.numpy()[slot]), salt=kept.salt
        )
        return logs, np.full(2, np.nan) if gate is None else gate

    def _replay_function(self, site: Any, kept: _SiteKept) -> Any:
        from gradwatch_tf._propagation import site_logs

        @tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.int32)])
        def replay(slot: tf.Tensor) -> Any:
            n = kept.n.read_value()[slot]
            x, mask, states, drops, mapping = _slot_inputs(
                site, kept, lambda v: v.read_value()[slot][:n], lambda v: v.read_value()[slot]
            )
            with keras.StatelessScope(state_mapping=mapping):
                logs, gate = site_logs(site, x, mask, states, drops, kept.step.read_value()[slot], kept.salt)
            if gate is None:
                gate = tf.fill([2], np.float32(np.nan))
            return logs, gate

        return replay


def _put(var: tf.Variable, value: Any, slot: Any) -> Any:
    """``var[slot] = value`` as one assign of the whole buffer (a distribution strategy's
    sync-on-read variables implement ``assign`` only)."""
    if int(var.shape[0]) == 1:
        return var.assign(tf.cast(value, var.dtype)[None])
    return var.assign(
        tf.tensor_scatter_nd_update(var.read_value(), tf.reshape(slot, [1, 1]), tf.cast(value, var.dtype)[None])
    )


def _slot_of(steps: tf.Variable, step: int) -> int | None:
    """The slot holding ``step`` (None: none does)."""
    found = np.flatnonzero(np.asarray(steps.numpy()) == step)
    return int(found[0]) if found.size else None


def _slot_inputs(
    site: Any, kept: _SiteKept, at: Callable[[tf.Variable], Any], whole: Callable[[tf.Variable], Any]
) -> tuple[Any, Any, list[list[Any]], list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """What a replay of one slot reads from the site's buffers, for the compiled replay
    (in graph) and the numpy one (on the host) alike: (x, mask, states per direction,
    dropout masks per direction, (cell weight, kept value) pairs). ``at(v)``: a buffer's
    valid rows at the slot; ``whole(v)``: its whole slot (the weights)."""
    weights = [
        (w, whole(v)) for (_, layer), bufs in zip(site.directions, kept.weights) for w, v in zip(layer.cell.weights, bufs)
    ]
    states = [[at(v) for v in bufs] for bufs in kept.states]
    drops = [tuple(_kept_rows(d, at) for d in pair) for pair in kept.drops]
    return at(kept.x), at(kept.mask), states, drops, weights


def _kept_rows(d: Any, at: Callable[[tf.Variable], tf.Tensor]) -> Any:
    if d is None:
        return None
    if isinstance(d, list):
        return [at(v) for v in d]
    return at(d)
