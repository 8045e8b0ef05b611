"""The host side of the Keras backend: install, set up, read the ring, close.

``optimizer.apply`` is wrapped on the instance (:mod:`gradwatch_tf._intercept`); the
wrapper adds the step's ops (:mod:`gradwatch_tf._step`) to the user's traced step. Each
step leaves one row in the core's statistics layout in a ring buffer; the host reads the
ring (``sync``) and feeds every row not seen yet, in order, to ``monitor.process``.

Nothing here raises into the training loop except ``NonFiniteGradientError`` with
``on_nonfinite="raise"``: a failure while building the extra ops is logged once at ERROR
and that part is left out (the original ``apply`` still runs).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch import HandleGroup, Layout, Segment, infer_layer
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.records import StepRecord
from gradwatch_tf import _recurrent, _tensors
from gradwatch_tf._intercept import drop_traced_functions, unwrap_optimizer, wrap_apply, xla_context
from gradwatch_tf._step import DevicePolicy, GraphContext, build_step

logger = logging.getLogger("gradwatch")

#: Ring rows for ``gradwatch.watch`` when nothing reads the ring after each step (a
#: ``jit_compile=True`` custom loop): records come to the host when ``watch.records`` is
#: read, and at most this many steps are kept in between.
DEFAULT_WATCH_CAPACITY = 256


def _known_layers(model: Any) -> list[str]:
    """Paths of the model's layers (nested models walked into), for :func:`infer_layer`:
    an LSTM's variables live in its cell (``"lstm/lstm_cell/kernel"``) but users know
    the layer (``"lstm"``)."""
    import keras

    out: list[str] = []

    def visit(layer: Any) -> None:
        for sub in getattr(layer, "_layers", []) or []:
            if isinstance(sub, keras.Model):
                visit(sub)
            elif isinstance(getattr(sub, "path", None), str):
                out.append(sub.path)

    visit(model)
    return out


class TFAttachment:
    """gradwatch's live connection to a Keras model and its optimizer.

    ``mode="watch"`` (``gradwatch.watch``): in eager mode the host reads each step right
    after it; in a ``tf.function`` without XLA a ``tf.py_function`` hands each step's row
    to the host; under XLA the ring keeps ``capacity`` steps until the next read.
    ``mode="callback"``: the callback reads the ring at each batch end.
    """

    backend = "tf"

    def __init__(self, model: Any, optimizer: Any | None, monitor: Any, *, mode: str = "watch", capacity: int | None = None) -> None:
        self._model_ref = weakref.ref(model)
        self._monitor = monitor
        self._mode = mode
        self._capacity = int(capacity) if capacity else (1 if mode == "callback" else DEFAULT_WATCH_CAPACITY)
        self._handles = HandleGroup()
        self._installed = False
        self._ready = False
        self._closed = False
        self._opt_arg = optimizer
        self._errors_logged: set[str] = set()
        self._pending_state: Mapping[str, Any] | None = None
        self._strategy: Any = None
        self.last_record: StepRecord | None = None
        self._last_step = 0
        if optimizer is not None or getattr(model, "optimizer", None) is not None:
            self._install()

    # ------------------------------------------------------------------ install
    def _fail(self, part: str, exc: BaseException) -> None:
        if part not in self._errors_logged:
            self._errors_logged.add(part)
            logger.error("gradwatch: %s failed and is now disabled: %r", part, exc, exc_info=exc)

    def _make_var(self, initial: Any, dtype: tf.DType, name: str) -> tf.Variable:
        if self._strategy is None:
            return tf.Variable(initial, dtype=dtype, trainable=False, name=name)
        with self._strategy.scope():
            # Each replica keeps its own copy and writes it in the replica context; the
            # values are identical (computed from all-reduced numbers), and the host reads
            # the first replica's.
            return tf.Variable(
                initial,
                dtype=dtype,
                trainable=False,
                name=name,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def _install(self) -> None:
        model = self._model_ref()
        if model is None:
            raise GradwatchError("The model watched by gradwatch no longer exists.")
        outer = self._opt_arg if self._opt_arg is not None else getattr(model, "optimizer", None)
        if outer is None:
            return
        opt = unwrap_optimizer(outer)
        strategy = getattr(opt, "_distribution_strategy", None)
        if strategy is None and tf.distribute.has_strategy():
            strategy = tf.distribute.get_strategy()
        self._strategy = strategy if (strategy is not None and strategy.num_replicas_in_sync > 1) else None
        self._opt = opt
        self._original_apply, restore = wrap_apply(opt, getattr(model, "name", "?"), self._apply)
        self._handles.add_callback(restore)
        self._installed = True
        # Recurrent layers: wrap their call now (before anything is traced); the probe
        # variables need the layer built and are created at the first call if need be.
        self._sites: list[_recurrent.RecurrentSite] = []
        if self._monitor.options.profile_every > 0:
            try:
                for site in _recurrent.find_sites(model):
                    probe = _recurrent.make_probe(site, self._make_var, lambda exc: self._fail("temporal probe", exc))
                    after = self._gate_hook(site) if _recurrent.forget_gate_feasible(site) else None
                    self._handles.add_callback(_recurrent.wrap_call(site, probe, after))
                    self._sites.append(site)
            except Exception as exc:  # noqa: BLE001 - profiling is optional
                self._fail("recurrent-layer profiling setup", exc)
        # A model that is not built yet (no Input, subclassed) gets the rest at the first
        # apply, when Keras has built it inside the first traced step.
        if list(model.trainable_variables):
            self._setup(list(model.trainable_variables))

    def _setup(self, variables: list[Any]) -> None:
        """Bind the parameters, create the probe variables, the ring and the layout (once)."""
        model = self._model_ref()
        known = _known_layers(model) if model is not None else []
        names = [v.path for v in variables]
        self._monitor.bind(names, [infer_layer(n, known) for n in names])
        meta = self._monitor.meta  # facts for the run file's header (the report shows them)
        meta.setdefault("backend", "tf")
        meta.setdefault("tensorflow", tf.__version__)
        meta.setdefault("recurrent_layers", {site.name: _recurrent.kind_of(site) for site in self._sites})
        sites, blocks = self._setup_sites()
        policy = self._monitor.policy
        unitwise = policy if getattr(policy, "unitwise", False) else None
        device_policy = DevicePolicy(policy, self._make_var) if policy is not None and unitwise is None else None
        p = len(variables)
        segments = [Segment("step", 1), Segment("skipped", 1), Segment("profiled", 1)]
        if policy is not None:
            segments.append(Segment("clip", 2))
        segments += [Segment("sq_norms", p), Segment("nonfinite", p)]
        if unitwise is not None:
            segments.append(Segment("clipped_sq", p))
        segments += [Segment("temporal", int(s.sq.shape[0]), key=s.name) for s in sites]  # type: ignore[union-attr]
        segments += [Segment("spectral", 1, key=b.name, labels=(b.name,)) for b in blocks]
        segments += [Segment("gates", 2, key=s.name, labels=("forget",)) for s in sites if s.gate_stats is not None]
        layout = Layout(segments)
        make = self._make_var
        self._graph = GraphContext(
            layout=layout,
            n_params=p,
            index={id(v): i for i, v in enumerate(variables)},
            path_index={v.path: i for i, v in enumerate(variables)},
            step_var=make(self._monitor.next_step, tf.int64, "gradwatch_step"),
            halted=make(False, tf.bool, "gradwatch_halted"),
            # False after close: a tf.function the user traced with the wrapper inside
            # keeps running its ops, so they must then stand aside (scale 1, no skip).
            active=make(True, tf.bool, "gradwatch_active"),
            ring=make(np.zeros([self._capacity, layout.width]), tf.float64, "gradwatch_ring"),
            capacity=self._capacity,
            on_nonfinite=self._monitor.options.on_nonfinite,
            profile_every=self._monitor.options.profile_every,
            policy=device_policy,
            unitwise=unitwise,
            sites=sites,
            blocks=blocks,
            fail=self._fail,
        )
        self._step_slice = layout.slice("step")
        self._last_step = self._monitor.next_step - 1
        if device_policy is not None:
            self._monitor.decide_on_device(device_policy)
        self._ready = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _setup_sites(self) -> tuple[list[Any], list[Any]]:
        """Probe and gate variables of each recurrent layer, and its spectral blocks."""
        sites: list[Any] = []
        blocks: list[Any] = []
        for site in self._sites:
            try:
                _recurrent.ensure_site_variables(site, self._make_var)
                if site.sq is not None:
                    sites.append(site)
                elif site.anchor is not None or site.layer.built:
                    logger.info("gradwatch: layer %r has no static sequence length; its per-timestep profile is skipped.", site.name)
                site.frozen = True
                for block in _recurrent.spectral_blocks(site):
                    try:  # exact warm start when the kernel can be read now
                        w = np.asarray(block.kernel.numpy())[:, block.start : block.stop]
                        start, cold = _tensors.top_right_singular_vector(w), False
                    except Exception:  # noqa: BLE001 - still being initialised inside a trace
                        start = np.random.default_rng(0).standard_normal(block.stop - block.start).astype(np.float32)
                        start, cold = start / np.linalg.norm(start), True
                    block.vector = self._make_var(start, tf.float32, "gradwatch_power")
                    block.cold = self._make_var(cold, tf.bool, "gradwatch_power_cold")
                    blocks.append(block)
            except Exception as exc:  # noqa: BLE001 - profiling is optional
                self._fail("recurrent-layer profiling setup", exc)
                site.frozen = True
        self._sites = sites
        return sites, blocks

    def _gate_hook(self, site: _recurrent.RecurrentSite) -> Any:
        """Forward-pass hook: on profiled steps, recompute the LSTM's forget gates."""
        from gradwatch import profile_due
        from gradwatch_tf._ops import TF

        def after(inputs: Any, outputs: Any, mask: Any) -> None:
            if "forget-gate statistics" in self._errors_logged or not self._ready:
                return
            try:
                if not (hasattr(outputs, "shape") and outputs.shape.rank == 3 and hasattr(inputs, "shape")):
                    return
                var = site.gate_stats
                if var is None:
                    return
                due = profile_due(self._graph.step_var.read_value(), max(self._monitor.options.profile_every, 1), TF)
                cell = site.layer.cell

                def compute() -> tf.Tensor:
                    var.assign(_recurrent.forget_gate_stats(cell, inputs, outputs, mask))  # type: ignore[union-attr]
                    return tf.constant(True)

                tf.cond(due, compute, lambda: tf.constant(False))
            except Exception as exc:  # noqa: BLE001 - gate statistics are optional
                self._fail("forget-gate statistics", exc)

        return after

    # ------------------------------------------------------------ in-graph step
    def _apply(self, grads: Any, trainable_variables: Any, original: Any) -> Any:
        if self._closed:
            return original(grads, trainable_variables)
        grads = list(grads)
        tvars = list(trainable_variables) if trainable_variables is not None else list(self._opt._trainable_variables)
        if not self._ready:
            try:
                with tf.init_scope():
                    self._setup(tvars)
            except Exception as exc:  # noqa: BLE001 - measuring is optional, the update is not
                self._fail("gradient measuring", exc)
                return original(grads, trainable_variables)
        self._graph.reached_update = False
        try:
            build_step(self._graph, grads, tvars, original, self._after_row())
        except Exception as exc:
            if self._graph.reached_update:
                raise  # the optimizer's own error: not ours to hide, nor to retry
            self._fail("gradient measuring", exc)
            return original(grads, trainable_variables)
        return None

    def _after_row(self) -> Any:
        """How a step's row reaches the host in ``mode="watch"`` (None: the ring is read later)."""
        if self._mode != "watch":
            return None
        if tf.executing_eagerly():
            return lambda row: self.sync()
        replica = tf.distribute.get_replica_context()
        if (replica is None or replica.num_replicas_in_sync == 1) and not xla_context():
            return lambda row: tf.py_function(self._host_row, [row], [])
        return None

    # ------------------------------------------------------------------ host side
    def _host_row(self, row: Any) -> None:
        """Host callback of a ``tf.function`` custom loop: one row, one record."""
        if not self._closed:
            self._process_rows(np.asarray(row.numpy(), dtype=np.float64).reshape(1, -1))

    def sync(self) -> None:
        """Read the ring once and turn every step not seen yet into a record (in order)."""
        self.sync_records()

    def sync_records(self) -> list[StepRecord]:
        """:meth:`sync`, returning the new records (oldest first)."""
        if not self._installed and not self._closed:
            model = self._model_ref()
            if model is not None and getattr(model, "optimizer", None) is not None:
                self._install()
        if not self._ready:
            return []
        try:
            ring = np.asarray(self._graph.ring.numpy(), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - reading is optional, training goes on
            self._fail("reading gradient statistics", exc)
            return []
        return self._process_rows(ring)

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
        if "forget-gate statistics" in self._errors_logged:
            stats = _without(stats, "gates")
        if not self._graph.profile_ok:
            stats = _without(stats, "spectral")
        try:
            record = self._monitor.process(stats)
        except NonFiniteGradientError:
            # The halted flag kept every later update of this execution from happening;
            # release it so that a caller who catches the error can go on.
            self._graph.halted.assign(False)
            raise
        except Exception as exc:  # noqa: BLE001 - recording is optional, training goes on
            self._fail("recording a step", exc)
            return None
        self.last_record = record
        return record

    # ------------------------------------------------------------------ protocol
    def step(self) -> StepRecord | None:
        """Keras has no manual measuring point: bring pending steps over, return the last."""
        self.sync()
        return self.last_record

    def close(self) -> None:
        """Restore the optimizer and every wrapped layer; idempotent."""
        if self._closed:
            return
        if self._ready:
            try:
                self.sync()
            except NonFiniteGradientError:
                pass
        self._closed = True
        if self._ready:
            try:
                self._graph.active.assign(False)
                self._graph.halted.assign(False)
            except Exception as exc:  # noqa: BLE001 - deactivating is best effort
                self._fail("deactivating", exc)
            if self._graph.policy is not None:
                self._monitor.decide_on_device(None)  # the policy state goes back to the host
        self._handles.remove()
        model = self._model_ref()
        if model is not None:
            drop_traced_functions(model)

    def state_dict(self) -> dict[str, Any]:
        """Power-iteration vectors (the policy's state is the monitor's to save)."""
        if not self._ready:
            return dict(self._pending_state or {})
        return {"power": {b.name: [float(x) for x in b.vector.numpy()] for b in self._graph.blocks}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self._ready:
            self._pending_state = dict(state)
            return
        for b in self._graph.blocks:
            vec = (state.get("power") or {}).get(b.name)
            if vec is not None and len(vec) == int(b.vector.shape[0]):
                b.vector.assign(np.asarray(vec, np.float32))
                b.cold.assign(False)
        # Re-align gradwatch's in-graph step counter with the (restored) monitor.
        self._graph.step_var.assign(self._monitor.next_step)
        self._graph.ring.assign(np.zeros([self._capacity, self._graph.layout.width]))
        self._last_step = self._monitor.next_step - 1


def _without(stats: Any, field_name: str) -> Any:
    import dataclasses

    return dataclasses.replace(stats, **{field_name: {}})


def attach(model: Any, optimizer: Any | None, monitor: Any) -> TFAttachment:
    """Entry for ``gradwatch.watch``: intercept ``optimizer.apply`` for custom loops."""
    return TFAttachment(model, optimizer, monitor, mode="watch")
