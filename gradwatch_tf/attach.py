"""The restorable in-graph wrapper of ``optimizer.apply`` and the host side that reads it.

How a step flows (all of it inside the user's ``tf.function``, under XLA too):

1. Keras' ``apply_gradients`` calls ``optimizer.apply``; gradwatch has replaced ``apply``
   *on the instance* (never on the class), so the wrapper below runs instead, once per
   trace, and adds its ops to the traced step.
2. Under a distribution strategy the gradients are still per replica: they are summed
   across replicas (one all-reduce, together with the per-timestep probe sums) for
   measuring only; the replicas' own gradients go on to Keras, which reduces them again.
3. Squared norms, non-finite flags, the policy's decision (state in ``tf.Variable``\\ s),
   clipping (one scale, or AGC's unit-wise factors), then the original ``apply`` --
   inside ``tf.cond`` when ``on_nonfinite`` is "skip" or "raise", so a bad step changes
   neither weights nor optimizer state nor ``iterations``.
4. One float64 row per step goes into a ring buffer variable of ``capacity`` rows,
   indexed by gradwatch's own step counter, so ``steps_per_execution = k`` loses no step.
5. The host reads the ring once (``sync``), and feeds ``Monitor.process`` each new row in
   order, passing the decision and the skip taken in-graph.

Nothing here raises into the training loop except ``NonFiniteGradientError`` with
``on_nonfinite="raise"``: a failure while building the extra ops is logged once at ERROR
and that part is left out (the original ``apply`` still runs).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.handles import HandleGroup
from gradwatch.records import ClipDecision, GateStats, StepRecord
from gradwatch_tf import _recurrent, _tensors

logger = logging.getLogger("gradwatch")

#: Ring rows for ``gradwatch.watch`` when nothing reads the ring after each step (a
#: ``jit_compile=True`` custom loop): records come to the host when ``watch.records`` is
#: read, and at most this many steps are kept in between.
DEFAULT_WATCH_CAPACITY = 256

# Row layout: fixed header, then per-parameter blocks.
_STEP, _THR, _SCALE, _SKIPPED, _PROFILED = range(5)
_HEADER = 5

_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()


def _xla_context() -> bool:
    """True while tracing inside ``jit_compile=True`` (no host callbacks there)."""
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - private API; assume XLA, the safe answer
        return True


def _layer_map(model: Any) -> dict[int, str]:
    """id(variable) -> the path of the outermost non-model layer owning it.

    A LSTM's variables belong to its cell ("lstm/lstm_cell"), but users know the layer
    ("lstm"), so layers nested in ordinary layers report under their outer layer; nested
    models are walked into.
    """
    import keras

    out: dict[int, str] = {}

    def visit(layer: Any) -> None:
        for sub in getattr(layer, "_layers", []) or []:
            if isinstance(sub, keras.Model):
                visit(sub)
                continue
            for w in sub.weights:
                out.setdefault(id(w), sub.path)

    visit(model)
    return out


def _unwrap_optimizer(opt: Any) -> Any:
    """The optimizer whose ``apply`` receives unscaled gradients.

    ``LossScaleOptimizer`` divides by the loss scale and then calls its inner optimizer's
    ``apply``: wrapping the inner one measures true gradients (and is not reached on
    overflow steps, which the loss scaler skips anyway).
    """
    inner = getattr(opt, "inner_optimizer", None)
    if inner is not None and type(opt).__name__ == "LossScaleOptimizer":
        return inner
    return opt


class TFAttachment:
    """gradwatch's live connection to a Keras model and its optimizer.

    ``mode="watch"`` (``gradwatch.watch``): in eager mode the host reads each step right
    after it; in a ``tf.function`` without XLA a ``tf.py_function`` hands each step's row
    to the host; under XLA the ring keeps ``capacity`` steps until the next read.
    ``mode="callback"``: the callback reads the ring at each batch end.
    """

    backend = "tf"

    def __init__(
        self,
        model: Any,
        optimizer: Any | None,
        monitor: Any,
        *,
        mode: str = "watch",
        capacity: int | None = None,
    ) -> None:
        self._model_ref = weakref.ref(model)
        self._monitor = monitor
        self._mode = mode
        self._capacity = int(capacity) if capacity else (1 if mode == "callback" else DEFAULT_WATCH_CAPACITY)
        self._handles = HandleGroup()
        self._installed = False
        self._closed = False
        self._opt_arg = optimizer
        self._errors_logged: set[str] = set()
        self._profile_ok = True
        self._pending_state: Mapping[str, Any] | None = None
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
        strategy = self._strategy
        if strategy is None:
            return tf.Variable(initial, dtype=dtype, trainable=False, name=name)
        with strategy.scope():
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
        opt = _unwrap_optimizer(outer)
        if opt in _WATCHED or "apply" in vars(opt):
            raise GradwatchError(
                f"The optimizer {type(opt).__name__!r} of model {getattr(model, 'name', '?')!r} is already "
                "watched (by gradwatch or by another wrapper of optimizer.apply); close the other watch first."
            )
        strategy = getattr(opt, "_distribution_strategy", None)
        self._strategy = strategy if (strategy is not None and strategy.num_replicas_in_sync > 1) else None
        if self._strategy is None and tf.distribute.has_strategy():
            s = tf.distribute.get_strategy()
            self._strategy = s if s.num_replicas_in_sync > 1 else None

        ref_policy = self._monitor.policy
        self._policy = _tensors.graph_policy(ref_policy, self._make_var)
        if ref_policy is not None and self._policy is None:
            logger.error("gradwatch: policy %r has no in-graph TensorFlow version; observing only.", ref_policy)
        self._agc = isinstance(self._policy, _tensors.GraphAGC)
        self._step_var = self._make_var(self._monitor.next_step, tf.int64, "gradwatch_step")
        self._halted = self._make_var(False, tf.bool, "gradwatch_halted")
        # False after close: a tf.function the user traced with the wrapper inside keeps
        # running its ops, so they must then stand aside (scale 1, no skip).
        self._active = self._make_var(True, tf.bool, "gradwatch_active")
        self._last_step = self._monitor.next_step - 1
        self._ready = False

        # Recurrent layers: wrap their call now (before anything is traced); the probe
        # variables need the layer built and are created at the first call if need be.
        self._sites: list[_recurrent.RecurrentSite] = []
        self._blocks: list[_recurrent.SpectralBlock] = []
        if self._monitor.options.profile_every > 0:
            try:
                self._wrap_recurrent(model)
            except Exception as exc:  # noqa: BLE001
                self._fail("recurrent-layer profiling setup", exc)

        self._opt = opt
        self._original_apply = opt.apply  # the bound class method
        attachment = self

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            return attachment._apply(grads, trainable_variables)

        apply.__doc__ = self._original_apply.__doc__
        apply.__gradwatch__ = True  # type: ignore[attr-defined]
        object.__setattr__(opt, "apply", apply)
        _WATCHED.add(opt)

        def restore_optimizer() -> None:
            if vars(opt).get("apply") is apply:
                object.__delattr__(opt, "apply")
            _WATCHED.discard(opt)

        self._handles.add_callback(restore_optimizer)
        self._installed = True
        # A model that is not built yet (no Input, subclassed) gets the rest at the first
        # apply, when Keras has built it inside the first traced step.
        if list(model.trainable_variables):
            self._setup(list(model.trainable_variables))
        if self._pending_state is not None and self._ready:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _wrap_recurrent(self, model: Any) -> None:
        for site in _recurrent.find_sites(model):
            probe = _recurrent.make_probe(site, self._make_var, lambda exc: self._fail("temporal probe", exc))
            after = self._gate_hook(site) if _recurrent.forget_gate_feasible(site) else None
            self._handles.add_callback(_recurrent.wrap_call(site, probe, after))
            self._sites.append(site)

    def _setup(self, variables: list[Any]) -> None:
        """Bind the parameters, create the probe variables and the ring (once)."""
        model = self._model_ref()
        layer_of = _layer_map(model) if model is not None else {}
        self._names = [v.path for v in variables]
        layers = [layer_of.get(id(v), v.path.rsplit("/", 1)[0] if "/" in v.path else v.path) for v in variables]
        self._monitor.bind(self._names, layers)
        meta = getattr(self._monitor, "meta", None)
        if isinstance(meta, dict):  # facts for the run file's header (the report shows them)
            meta.setdefault("backend", "tf")
            meta.setdefault("tensorflow", tf.__version__)
            meta.setdefault("recurrent_layers", [getattr(site, "name", str(site)) for site in self._sites])
        self._index = {id(v): i for i, v in enumerate(variables)}
        self._path_index = {v.path: i for i, v in enumerate(variables)}
        p = len(variables)

        sites = []
        for site in self._sites:
            try:
                _recurrent.ensure_site_variables(site, self._make_var)
                if site.sq is not None:
                    sites.append(site)
                elif site.anchor is not None or site.layer.built:
                    logger.info(
                        "gradwatch: layer %r has no static sequence length; its per-timestep profile is skipped.",
                        site.name,
                    )
                site.frozen = True
                for block in _recurrent.spectral_blocks(site):
                    units = block.stop - block.start
                    try:  # exact warm start when the kernel can be read now
                        w = np.asarray(block.kernel.numpy())[:, block.start : block.stop]
                        start, cold = _tensors.top_right_singular_vector(w), False
                    except Exception:  # noqa: BLE001 - still being initialised inside a trace
                        start = np.random.default_rng(0).standard_normal(units).astype(np.float32)
                        start, cold = start / np.linalg.norm(start), True
                    block.vector = self._make_var(start, tf.float32, "gradwatch_power")
                    block.cold = self._make_var(cold, tf.bool, "gradwatch_power_cold")
                    self._blocks.append(block)
            except Exception as exc:  # noqa: BLE001
                self._fail("recurrent-layer profiling setup", exc)
                site.frozen = True
        self._sites = sites

        # Row layout.
        self._o_sq = _HEADER
        self._o_nf = self._o_sq + p
        off = self._o_nf + p
        self._o_clipped = off
        if self._agc:
            off += p
        self._o_temporal = []
        for site in self._sites:
            n = int(site.sq.shape[0])  # type: ignore[union-attr]
            self._o_temporal.append((site.name, off, off + n))
            off += n
        self._o_spectral = off
        off += len(self._blocks)
        self._o_gates = []
        for site in self._sites:
            if site.gate_stats is not None:
                self._o_gates.append((site.name, off))
                off += 2
        self._width = off
        self._ring = self._make_var(np.zeros([self._capacity, self._width]), tf.float64, "gradwatch_ring")
        self._ready = True

    def _gate_hook(self, site: _recurrent.RecurrentSite) -> Callable[[Any, Any, Any], None]:
        """Forward-pass hook: on profiled steps, recompute the LSTM's forget gates."""

        def after(inputs: Any, outputs: Any, mask: Any) -> None:
            if "forget-gate statistics" in self._errors_logged:
                return
            try:
                if not (hasattr(outputs, "shape") and outputs.shape.rank == 3 and hasattr(inputs, "shape")):
                    return
                step = self._step_var.read_value()
                every = max(self._monitor.options.profile_every, 1)
                due = tf.logical_or(tf.equal(step, 1), tf.equal(tf.math.floormod(step, every), 0))
                if not site.frozen:
                    _recurrent.ensure_site_variables(site, self._make_var, inputs)
                cell = site.layer.cell
                var = site.gate_stats
                if var is None:
                    return

                def compute() -> tf.Tensor:
                    value = _recurrent.forget_gate_stats(cell, inputs, outputs, mask)
                    var.assign(value)  # type: ignore[union-attr]
                    return tf.constant(True)

                tf.cond(due, compute, lambda: tf.constant(False))
            except Exception as exc:  # noqa: BLE001
                self._fail("forget-gate statistics", exc)

        return after

    # ------------------------------------------------------------ in-graph step
    def _apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        original = self._original_apply
        if self._closed:
            return original(grads, trainable_variables)
        grads = list(grads)
        self._reached_update = False
        try:
            if not self._ready:
                tvars = (
                    list(trainable_variables)
                    if trainable_variables is not None
                    else list(self._opt._trainable_variables)
                )
                with tf.init_scope():
                    self._setup(tvars)
                    if self._pending_state is not None:
                        state, self._pending_state = self._pending_state, None
                        self.load_state_dict(state)
            return self._build_step(grads, trainable_variables)
        except Exception as exc:
            if self._reached_update:
                raise  # the optimizer's own error: not ours to hide, nor to retry
            self._fail("gradient measuring", exc)
            return original(grads, trainable_variables)

    def _build_step(self, grads: list[Any], trainable_variables: Any) -> Any:
        original = self._original_apply
        opt = self._opt
        if trainable_variables is not None:
            tvars = list(trainable_variables)
        else:
            tvars = list(opt._trainable_variables)
        idx = [self._index.get(id(v), self._path_index.get(getattr(v, "path", None))) for v in tvars]
        f64 = tf.float64
        p = len(self._names)

        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        temporal_sq = [site.sq.read_value() for site in self._sites]  # type: ignore[union-attr]
        gate_vals = [site.gate_stats.read_value() for site in self._sites if site.gate_stats is not None]
        measured = list(grads)
        if replicas > 1:
            present = [i for i, g in enumerate(grads) if g is not None]
            dense = [tf.convert_to_tensor(grads[i]) for i in present]
            reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, dense + temporal_sq + gate_vals)
            for k, i in enumerate(present):
                measured[i] = reduced[k]
            nt = len(temporal_sq)
            temporal_sq = list(reduced[len(dense) : len(dense) + nt])
            # Gate statistics are means over each replica's equal share: average them.
            gate_vals = [g / replicas for g in reduced[len(dense) + nt :]]

        zero = tf.constant(0.0, f64)
        sq_each = [_tensors.squared_norm(g) if g is not None else zero for g in measured]
        fin_each = [_tensors.all_finite(g) if g is not None else tf.constant(True) for g in measured]
        all_ok = tf.reduce_all(tf.stack(fin_each)) if fin_each else tf.constant(True)
        total = tf.add_n(sq_each) if sq_each else zero
        norm = tf.sqrt(total)

        per_sq: list[tf.Tensor] = [zero] * p
        per_nf: list[tf.Tensor] = [zero] * p
        for j, pi in enumerate(idx):
            if pi is not None:
                per_sq[pi] = sq_each[j]
                per_nf[pi] = tf.cast(tf.logical_not(fin_each[j]), f64)

        active = self._active.read_value()
        # Policy and clipping.
        thr = tf.constant(math.nan, f64)
        scale = tf.constant(1.0, f64)
        new_grads = grads
        clipped_sq: list[tf.Tensor] = []
        if isinstance(self._policy, _tensors.GraphAGC):
            pol = self._policy
            new_grads = []
            per_clipped: list[tf.Tensor] = [zero] * p
            after_each = []
            for j, (g, m, v) in enumerate(zip(grads, measured, tvars)):
                if g is None:
                    new_grads.append(g)
                    after_each.append(zero)
                    continue
                m = tf.convert_to_tensor(m)  # IndexedSlices (embeddings) densified for unit norms
                factor = _tensors.agc_factor(v.value if hasattr(v, "value") else v, m, pol.clip_factor, pol.eps)
                factor = tf.where(active, factor, tf.ones_like(factor))
                new_grads.append(_scale(g, factor))
                a = _tensors.squared_norm(tf.cast(tf.convert_to_tensor(m), tf.float32) * factor)
                after_each.append(a)
                pj = idx[j]
                if pj is not None:
                    per_clipped[pj] = a
            thr, scale = pol.decision(norm, tf.sqrt(tf.add_n(after_each)))
            clipped_sq = per_clipped
        elif self._policy is not None:
            thr, scale = self._policy.decide(norm)
            scale = tf.where(active, scale, tf.ones_like(scale))
            new_grads = [_scale(g, scale) if g is not None else g for g in grads]

        # Spectral norms on profiled steps.
        step = self._step_var.read_value()
        profiled = tf.constant(False)
        spectral: list[tf.Tensor] = []
        if self._blocks and self._profile_ok:
            try:
                every = self._monitor.options.profile_every
                profiled = tf.logical_or(tf.equal(step, 1), tf.equal(tf.math.floormod(step, every), 0))
                blocks = self._blocks

                def compute() -> tf.Tensor:
                    out = []
                    for b in blocks:
                        kv = b.kernel.value if hasattr(b.kernel, "value") else b.kernel
                        w = tf.convert_to_tensor(kv)[:, b.start : b.stop]
                        vec, cold = b.vector, b.cold
                        sigma = tf.cond(
                            cold.read_value(),  # type: ignore[union-attr]
                            lambda w=w, vec=vec: _tensors.power_iteration(w, vec, 30),  # type: ignore[misc]
                            lambda w=w, vec=vec: _tensors.power_iteration(w, vec, 2),  # type: ignore[misc]
                        )
                        with tf.control_dependencies([sigma]):
                            cold.assign(False)  # type: ignore[union-attr]
                        out.append(tf.cast(sigma, f64))
                    return tf.stack(out)

                spec = tf.cond(profiled, compute, lambda: tf.zeros([len(blocks)], f64))
                spectral = [spec]
            except Exception as exc:  # noqa: BLE001
                self._fail("spectral norms", exc)
                self._profile_ok = False
                spectral = [tf.zeros([len(self._blocks)], f64)]
        elif self._blocks:
            spectral = [tf.zeros([len(self._blocks)], f64)]
        if self._sites and self._monitor.options.profile_every > 0:
            every = self._monitor.options.profile_every
            profiled = tf.logical_or(tf.equal(step, 1), tf.equal(tf.math.floormod(step, every), 0))

        # The update itself. Everything that could fail is built above this point, so a
        # failure never leaves a half-built step that applies the gradients twice.
        mode = self._monitor.options.on_nonfinite
        self._reached_update = True
        if mode in ("skip", "raise"):
            go = tf.logical_and(all_ok, tf.logical_not(self._halted.read_value()))
            go = tf.logical_or(go, tf.logical_not(active))

            def do_apply() -> tf.Tensor:
                original(new_grads, trainable_variables)
                return tf.constant(True)

            if replicas > 1:
                _cond_apply_distributed(ctx, go, new_grads, trainable_variables, original)
            else:
                tf.cond(go, do_apply, lambda: tf.constant(False))
            skipped = tf.logical_not(go)
        else:
            original(new_grads, trainable_variables)
            skipped = tf.constant(False)

        try:
            if mode == "raise":
                self._halted.assign(tf.logical_or(self._halted.read_value(), tf.logical_not(all_ok)))
            parts = [
                tf.stack([tf.cast(step, f64), thr, scale, tf.cast(skipped, f64), tf.cast(profiled, f64)]),
                tf.stack(per_sq) if p else tf.zeros([0], f64),
                tf.stack(per_nf) if p else tf.zeros([0], f64),
            ]
            if self._agc:
                parts.append(tf.stack(clipped_sq) if p else tf.zeros([0], f64))
            parts += [tf.cast(t, f64) for t in temporal_sq]
            parts += spectral
            parts += [tf.cast(g, f64) for g in gate_vals]
            row = tf.concat(parts, axis=0)
            slot = tf.math.floormod(step - 1, self._capacity)
            # assign of a whole (small) ring rather than scatter: sync-on-read variables
            # (distribution strategies) implement assign only.
            ring = tf.tensor_scatter_nd_update(
                self._ring.read_value(), tf.reshape(slot, [1, 1]), tf.reshape(row, [1, -1])
            )
            self._ring.assign(ring)
            self._step_var.assign_add(1)

            if self._mode == "watch":
                if tf.executing_eagerly():
                    self.sync()
                elif replicas == 1 and not _xla_context():
                    tf.py_function(self._host_row, [row], [])
        except NonFiniteGradientError:
            raise
        except Exception as exc:  # noqa: BLE001 - the update above has happened; only recording fails
            self._fail("recording gradient statistics", exc)
        return None

    # ------------------------------------------------------------------ host side
    def _host_row(self, row: Any) -> None:
        """Host callback of a ``tf.function`` custom loop: one row, one record."""
        if self._closed:
            return
        self._process_rows(np.asarray(row.numpy(), dtype=np.float64).reshape(1, -1))

    def sync(self) -> None:
        """Read the ring once and turn every step not seen yet into a record (in order)."""
        self.sync_records()

    def sync_records(self) -> list[StepRecord]:
        """:meth:`sync`, returning the new records (oldest first)."""
        if not self._installed:
            if not self._closed:
                model = self._model_ref()
                if model is not None and getattr(model, "optimizer", None) is not None:
                    self._install()
            if not self._installed:
                return []
        if not self._ready:
            return []
        try:
            ring = np.asarray(self._ring.numpy(), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            self._fail("reading gradient statistics", exc)
            return []
        return self._process_rows(ring)

    def _process_rows(self, rows: np.ndarray) -> list[StepRecord]:
        steps = rows[:, _STEP]
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
            out.append(self._process_row(rows[i]))
            self._last_step = int(rows[i, _STEP])
        return [r for r in out if r is not None]

    def _process_row(self, row: np.ndarray) -> StepRecord | None:
        p = len(self._names)
        monitor = self._monitor
        sq = row[self._o_sq : self._o_sq + p]
        nonfinite = row[self._o_nf : self._o_nf + p] > 0.5
        skipped = bool(row[_SKIPPED] > 0.5)
        profiled = bool(row[_PROFILED] > 0.5)
        decision = None
        if self._policy is not None:
            decision = ClipDecision(float(row[_THR]), float(row[_SCALE]), self._policy.name)
        if nonfinite.any() and monitor.options.on_nonfinite == "raise":
            decision = None  # the monitor raises only when it decided itself
        temporal: dict[str, np.ndarray] = {}
        spectral: dict[str, float] = {}
        gates: dict[str, GateStats] = {}
        if profiled:
            if "temporal probe" not in self._errors_logged:
                for name, a, b in self._o_temporal:
                    temporal[name] = np.sqrt(np.maximum(row[a:b], 0.0))
            if self._profile_ok:
                for k, block in enumerate(self._blocks):
                    spectral[block.name] = float(row[self._o_spectral + k])
            if "forget-gate statistics" not in self._errors_logged:
                for name, a in self._o_gates:
                    gates[name] = GateStats("f", float(row[a]), float(row[a + 1]))
        clipped = row[self._o_clipped : self._o_clipped + p] if self._agc else None
        try:
            record = monitor.process(
                sq,
                nonfinite=nonfinite,
                temporal=temporal,
                spectral=spectral,
                gates=gates,
                clipped_sq_norms=clipped,
                decision=decision,
                skipped=skipped,
            )
        except NonFiniteGradientError:
            # The halted flag kept every later update of this execution from happening;
            # release it so that a caller who catches the error can go on.
            self._halted.assign(False)
            self._last_step = int(row[_STEP])
            raise
        except Exception as exc:  # noqa: BLE001
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
        if self._installed:
            try:
                self._active.assign(False)
                self._halted.assign(False)
            except Exception as exc:  # noqa: BLE001
                self._fail("deactivating", exc)
        self._handles.remove()
        model = self._model_ref()
        if model is not None:
            _drop_traced_functions(model)

    def state_dict(self) -> dict[str, Any]:
        """In-graph state: the policy (JSON, the core policy's layout) and power-iteration vectors."""
        if not self._ready:
            return dict(self._pending_state or {})
        state: dict[str, Any] = {"version": 1}
        if self._policy is not None:
            pol = self._policy.state_dict()
            state["policy"] = pol
            try:  # keep the core's copy of the policy state truthful too
                self._monitor.policy.load_state_dict(pol)
            except Exception as exc:  # noqa: BLE001
                logger.debug("gradwatch: the core policy did not take the in-graph state: %r", exc)
        state["power"] = {b.name: [float(x) for x in b.vector.numpy()] for b in self._blocks}  # type: ignore[union-attr]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self._ready:
            self._pending_state = dict(state)
            return
        if self._policy is not None and state.get("policy") is not None:
            self._policy.load_state_dict(state["policy"])
        for b in self._blocks:
            vec = (state.get("power") or {}).get(b.name)
            if vec is not None and len(vec) == int(b.vector.shape[0]):  # type: ignore[union-attr]
                b.vector.assign(np.asarray(vec, np.float32))  # type: ignore[union-attr]
        # Re-align gradwatch's in-graph step counter with the (restored) monitor.
        self._step_var.assign(self._monitor.next_step)
        self._ring.assign(np.zeros([self._capacity, self._width]))
        self._last_step = self._monitor.next_step - 1


def _scale(g: Any, factor: tf.Tensor) -> Any:
    """``g * factor`` in g's dtype; IndexedSlices keep their sparsity."""
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype), g.indices, g.dense_shape)
    return g * tf.cast(factor, g.dtype)


def _cond_apply_distributed(
    ctx: Any, go: tf.Tensor, grads: list[Any], tvars: Any, original: Callable[..., Any]
) -> None:
    """Skip-or-apply under a distribution strategy.

    A ``tf.cond`` in the replica context cannot contain the optimizer's ``merge_call``;
    like Keras' ``LossScaleOptimizer``, go to the cross-replica context, branch there and
    run the original ``apply`` in each replica. ``go`` is identical on every replica
    (computed from all-reduced values), so the first replica's copy decides.
    """

    def cross(distribution: Any, go: Any, grads: Any, tvars: Any) -> None:
        flag = distribution.experimental_local_results(go)[0]

        def do() -> tf.Tensor:
            distribution.extended.call_for_each_replica(original, args=(grads, tvars))
            return tf.constant(True)

        tf.cond(flag, do, lambda: tf.constant(False))

    ctx.merge_call(cross, args=(go, grads, tvars))


def _drop_traced_functions(model: Any) -> None:
    """Forget Keras' cached traced step functions.

    The cached ``train_function`` was traced with gradwatch's wrappers in it; restoring
    the Python attributes does not change a graph already traced, so the next ``fit``
    must retrace without them. Keras rebuilds these lazily (as after ``compile``).
    """
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception as exc:  # noqa: BLE001
                logger.debug("gradwatch: could not drop %s: %r", attr, exc)


def attach(model: Any, optimizer: Any | None, monitor: Any) -> TFAttachment:
    """Entry for ``gradwatch.watch``: intercept ``optimizer.apply`` for custom loops."""
    return TFAttachment(model, optimizer, monitor, mode="watch")
