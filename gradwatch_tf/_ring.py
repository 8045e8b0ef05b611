"""The host side's reading of the ring: every row the device wrote, once, in step order.

Each optimizer step leaves one row of the core's statistics layout in a ring buffer
variable (``GraphContext.ring``), indexed by gradwatch's own step counter. The host reads
the ring (at a ``fit`` batch end, after an eager step, through a ``tf.py_function`` in a
traced custom loop, or when ``watch.records`` is read) and hands each row not seen yet to
``monitor.process``. A mixin of :class:`gradwatch_tf.attach.TFAttachment`, whose state it
uses (``_graph``, ``_monitor``, ``_last_step``, ...).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from gradwatch.errors import NonFiniteGradientError
from gradwatch.records import StepRecord

__all__ = ["RingReader"]

logger = logging.getLogger("gradwatch")


class RingReader:
    """Reading the ring buffer on the host (see the module docstring)."""

    _graph: Any
    _monitor: Any
    _mode: str
    _closed: bool
    _installed: bool
    _suspended: bool
    _ready: bool
    _capacity: int
    _last_step: int
    #: A NaN spectral norm or per-timestep profile in a row means "not measured" (JAX/torch
    #: Keras: NaN where it was not): left out of the record.
    spectral_nan_unmeasured = False
    _step_slice: Any
    _errors_logged: set[str]
    _model_ref: Any
    last_record: StepRecord | None

    def _fail(self, part: str, exc: BaseException) -> None:  # pragma: no cover - TFAttachment's
        raise NotImplementedError

    def _install(self) -> None:  # pragma: no cover - TFAttachment's
        raise NotImplementedError

    def _after_row(self) -> Any:
        """How a step's row reaches the host in ``mode="watch"`` (None: the ring is read later)."""
        if self._mode != "watch":
            return None
        import tensorflow as tf

        from gradwatch_tf._intercept import xla_context

        if tf.executing_eagerly():
            return lambda row: self.sync()
        replica = tf.distribute.get_replica_context()
        if (replica is None or replica.num_replicas_in_sync == 1) and not xla_context():
            return lambda row: tf.py_function(self._host_row, [row], [])
        return None

    def _host_row(self, row: Any) -> None:
        """Host callback of a ``tf.function`` custom loop: one row, one record."""
        if not self._closed:
            self._process_rows(np.asarray(row.numpy(), dtype=np.float64).reshape(1, -1))

    def sync(self) -> None:
        """Read the ring once and turn every step not seen yet into a record (in order)."""
        self.sync_records()

    def sync_records(self) -> list[StepRecord]:
        """:meth:`sync`, returning the new records (oldest first)."""
        if not self._installed and not self._closed and not self._suspended:
            model = self._model_ref()
            if model is not None and getattr(model, "optimizer", None) is not None:
                self._install()
        if not self._ready:
            return []
        try:
            ring = self._read_ring()
        except Exception as exc:  # noqa: BLE001 - reading is optional, training goes on
            self._fail("reading gradient statistics", exc)
            return []
        return self._process_rows(ring)

    def _read_ring(self) -> np.ndarray:
        return np.asarray(self._graph.ring.numpy(), dtype=np.float64)

    def _process_rows(self, rows: np.ndarray) -> list[StepRecord]:
        steps = rows[:, self._step_slice].reshape(-1)
        new = np.flatnonzero(steps > self._last_step)
        if new.size == 0:
            return []
        new = new[np.argsort(steps[new])]
        first = int(steps[new[0]])
        if first != self._last_step + 1 and "lost" not in self._errors_logged:
            self._errors_logged.add("lost")
            logger.warning(
                "gradwatch: %d steps were not read before the ring buffer (%d steps) wrapped; they have no record.",
                first - self._last_step - 1,
                self._capacity,
            )
        out = []
        for i in new:
            self._last_step = int(steps[i])
            record = self._process_row(rows[i])
            if record is not None:
                out.append(record)
        return out

    def _process_row(self, row: np.ndarray) -> StepRecord | None:
        layout = self._graph.layout
        stats = layout.unpack(row, getattr(self._monitor.policy, "name", None))
        if "temporal probe" in self._errors_logged:
            stats = _without(stats, "temporal")
        if "propagation replay" in self._errors_logged:
            stats = _without(_without(_without(stats, "gates"), "propagation"), "max_gains")
        elif stats.propagation or stats.gates:
            stats = _replayed_only(stats)
        if not self._graph.profile_ok:
            stats = _without(stats, "spectral")
        elif self.spectral_nan_unmeasured and stats.spectral:
            stats = dataclasses.replace(stats, spectral={k: v for k, v in stats.spectral.items() if not np.isnan(v)})
        if self.spectral_nan_unmeasured and stats.temporal:  # (a layer not probed this step)
            stats = dataclasses.replace(stats, temporal={k: v for k, v in stats.temporal.items() if not np.isnan(v).all()})
        try:
            record = self._monitor.process(stats)
        except NonFiniteGradientError:
            # The halted flag kept every later update of this execution from happening;
            # release it so that a caller who catches the error can go on.
            self._graph.halted.assign(np.asarray(False))
            raise
        except Exception as exc:  # noqa: BLE001 - recording is optional, training goes on
            self._fail("recording a step", exc)
            return None
        self.last_record = record
        return record



def _without(stats: Any, field_name: str) -> Any:
    return dataclasses.replace(stats, **{field_name: {}})


def _replayed_only(stats: Any) -> Any:
    """Leave out the propagation and gates of layers not replayed for this very step (the
    device sends NaN for those, e.g. a layer the step did not call)."""
    prop = {k: v for k, v in stats.propagation.items() if not all(np.isnan(g).all() for g in v.values())}
    top = {k: v for k, v in stats.max_gains.items() if k in prop}
    gates = {k: g for k, g in stats.gates.items() if not np.isnan(g.mean)}
    if len(prop) == len(stats.propagation) and len(gates) == len(stats.gates):
        return stats
    return dataclasses.replace(stats, propagation=prop, max_gains=top, gates=gates)


