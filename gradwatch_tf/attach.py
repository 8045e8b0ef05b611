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

import functools
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch import HandleGroup, infer_layer, profile_due
from gradwatch.records import StepRecord
from gradwatch_tf import _recurrent, _tensors
from gradwatch_tf._intercept import drop_traced_functions
from gradwatch_tf._lifecycle import Lifecycle
from gradwatch_tf._live import forget_bias_reader, site_forget_bias
from gradwatch_tf._step import DevicePolicy, GraphContext, build_step, step_layout

logger = logging.getLogger("gradwatch")

#: Ring rows for ``gradwatch.watch`` when nothing reads the ring after each step (a
#: ``jit_compile=True`` custom loop): records come to the host when ``watch.records`` is
#: read, and at most this many steps are kept in between.
DEFAULT_WATCH_CAPACITY = 256


def _known_layers(model: Any) -> dict[str, str]:
    """Paths of the model's layers and their class names (see
    :func:`gradwatch_tf._kstate.known_layers`): the paths for :func:`infer_layer` (an LSTM's
    variables live in its cell, ``"lstm/lstm_cell/kernel"``, but users know the layer,
    ``"lstm"``), the names for the report's labels."""
    from gradwatch_tf._kstate import known_layers

    return known_layers(model)


class TFAttachment(Lifecycle):
    """gradwatch's live connection to a Keras model and its optimizer.

    ``mode="watch"`` (``gradwatch.watch``): in eager mode the host reads each step right
    after it; in a ``tf.function`` without XLA a ``tf.py_function`` hands each step's row
    to the host; under XLA the ring keeps ``capacity`` steps until the next read.
    ``mode="callback"``: the callback reads the ring at the end of a batch that flushes
    (``log_every``) or profiles, when the ring is full, and at every batch with
    ``on_nonfinite="raise"`` (:meth:`read_due`); the other batches cost no host transfer.
    """

    backend = "tf"

    def __init__(
        self, model: Any, optimizer: Any | None, monitor: Any, *, mode: str = "watch", capacity: int | None = None
    ) -> None:
        self._model_ref = weakref.ref(model)
        self._monitor = monitor
        self._mode = mode
        if mode == "callback":  # room for the steps between two reads (read_due)
            wanted = min(max(int(monitor.options.log_every), 1), DEFAULT_WATCH_CAPACITY)
            self._capacity = max(int(capacity or 1), wanted)
        else:
            self._capacity = int(capacity) if capacity else DEFAULT_WATCH_CAPACITY
        self._unread = 0  # steps run since the last read of the ring (callback mode)
        self._handles = HandleGroup()
        #: What ``_install`` put on Python objects, as functions that put it there again
        #: and return its undo: :meth:`resume` re-applies them after :meth:`suspend`.
        self._wrappers: list[Callable[[], Callable[[], None]]] = []
        self._installed = False
        self._ready = False
        self._closed = False
        self._suspended = False
        self._held_state: dict[str, Any] | None = None  # state_dict() while suspended
        self._opt_arg = optimizer
        self._errors_logged: set[str] = set()
        self._pending_state: Mapping[str, Any] | None = None
        self._strategy: Any = None
        self.last_record: StepRecord | None = None
        self._last_step = 0
        #: Set by the callback: True when a wrapper runs outside the ``fit`` it was
        #: installed for (that fit ended where no hook could see it); it has then already
        #: restored everything and flushed the sinks, and the wrapper delegates.
        self.outside_fit: Callable[[], bool] | None = None
        #: Read while Keras traces a train function: True for the callback's *lean* one
        #: (:meth:`lean_due`), whose trace leaves the recurrent layers' calls as they are
        #: (no sensitivity probe, no replay) and records no profile.
        self.lean = False
        self._full_traced = False  # a trace with everything has been built (it makes the variables)
        #: ``fit``: the profile is measured beside the train step, when the host reads a
        #: profiled row (:mod:`gradwatch_tf._tfhost`); a custom loop measures it in graph.
        self._host: Any = None
        if mode == "callback":
            from gradwatch_tf._tfhost import HostProfile

            every = max(int(monitor.options.profile_every), 1)
            spe = max(int(capacity or 1), 1)  # steps_per_execution
            self._host = HostProfile(self._make_var, self._fail, per_execution=spe, every=every)
            self.spectral_nan_unmeasured = True  # NaN: not measured (not ready, or not kept for that step)
        if optimizer is not None or getattr(model, "optimizer", None) is not None:
            self._install()

    # ------------------------------------------------------------------ install
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
        held = self._wrap_optimizer()
        if held is None:
            return
        model = held[0]
        strategy = getattr(self._opt, "_distribution_strategy", None)
        if strategy is None and tf.distribute.has_strategy():
            strategy = tf.distribute.get_strategy()
        self._strategy = strategy if (strategy is not None and strategy.num_replicas_in_sync > 1) else None
        # Recurrent layers: wrap their call now (before anything is traced); the probe
        # variables need the layer built and are created at the first call if need be.
        self._sites: list[_recurrent.RecurrentSite] = []
        if self._monitor.options.profile_every > 0:
            try:
                for site in _recurrent.find_sites(model):
                    probe = _recurrent.make_probe(site, self._make_var, lambda exc: self._fail("temporal probe", exc))
                    after = self._gate_hook(site) if _recurrent.forget_gate_feasible(site) else None
                    self._hold(functools.partial(_recurrent.wrap_call, site, probe, after, self._live))
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
        known = _known_layers(model) if model is not None else {}
        names = [v.path for v in variables]
        layers = [infer_layer(n, list(known)) for n in names]
        self._monitor.bind(names, layers)
        meta = self._monitor.meta  # facts for the run file's header (the report shows them)
        meta.setdefault("layer_types", {layer: known[layer] for layer in dict.fromkeys(layers) if layer in known})
        meta.setdefault("backend", "tf")
        meta.setdefault("tensorflow", tf.__version__)
        meta.setdefault("recurrent_layers", {site.name: _recurrent.kind_of(site) for site in self._sites})
        meta.setdefault("recurrence_weights", {site.name: _recurrent.recurrence_weights(site) for site in self._sites})
        biases = {site.name: b for site in self._sites if (b := site_forget_bias(site)) is not None}
        meta.setdefault("forget_bias", biases)  # the remedies read it (Keras starts at 1: unit_forget_bias)
        live = getattr(self._monitor, "live", None)
        if isinstance(live, dict) and self._sites:  # ... as it is when an alert is written
            live["forget_bias"] = forget_bias_reader(self._sites)
        sites, blocks = self._setup_sites()
        policy = self._monitor.policy
        unitwise = policy if getattr(policy, "unitwise", False) else None
        device_policy = DevicePolicy(policy, self._make_var) if policy is not None and unitwise is None else None
        p = len(variables)
        layout = step_layout(self._monitor.policy, p, sites, blocks)
        make = self._make_var
        # The recurrent layers' forward hooks may have made the step counter and the
        # active flag already (a model built inside its first traced step): one of each.
        step_var, active = self.__dict__.get("_forward_counters") or (
            make(self._monitor.next_step, tf.int64, "gradwatch_step"),
            make(True, tf.bool, "gradwatch_active"),
        )
        self._graph = GraphContext(
            layout=layout,
            n_params=p,
            index={id(v): i for i, v in enumerate(variables)},
            path_index={v.path: i for i, v in enumerate(variables)},
            step_var=step_var,
            halted=make(False, tf.bool, "gradwatch_halted"),
            # False after close: a tf.function the user traced with the wrapper inside
            # keeps running its ops, so they must then stand aside (scale 1, no skip).
            active=active,
            ring=make(np.zeros([self._capacity, layout.width]), tf.float64, "gradwatch_ring"),
            capacity=self._capacity,
            on_nonfinite=self._monitor.options.on_nonfinite,
            profile_every=self._monitor.options.profile_every,
            policy=device_policy,
            unitwise=unitwise,
            sites=sites,
            blocks=blocks,
            fail=self._fail,
            relayout=self._relayout if self.__dict__.get("_waiting_sites") else None,
            host=self._host,
        )
        self._step_slice = layout.slice("step")
        self._last_step = self._monitor.next_step - 1
        if device_policy is not None:
            self._monitor.decide_on_device(device_policy)
        self._ready = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _relayout(self) -> None:
        """Called once by the in-graph step while its first trace is built: layers whose
        sequence length the model does not declare (``Input((None, F))``) but the traced
        step has shown join the layout (a new, wider ring); the others are left out and
        an INFO line says so."""
        g = self._graph
        g.relayout = None
        waiting = self.__dict__.pop("_waiting_sites", None) or []
        seen = [s for s in waiting if s.sq is not None or s.prop is not None]
        for s in waiting:
            s.frozen = True
            if s not in seen:
                logger.info(
                    "gradwatch: layer %r has no static sequence length in the traced step; its per-timestep profile "
                    "and propagation are skipped.",
                    s.name,
                )
        if not seen:
            return
        with tf.init_scope():
            recorded = (
                int(g.step_var.numpy()) != self._monitor.next_step or self._last_step != self._monitor.next_step - 1
            )
            if recorded:  # rows of the old layout may wait in the ring: keep it
                return
            g.sites = g.sites + seen
            self._sites = g.sites
            g.layout = step_layout(self._monitor.policy, g.n_params, g.sites, g.blocks)
            g.ring = self._make_var(np.zeros([self._capacity, g.layout.width]), tf.float64, "gradwatch_ring")
            self._step_slice = g.layout.slice("step")

    def _setup_sites(self) -> tuple[list[Any], list[Any]]:
        """Probe, propagation and gate variables of each recurrent layer, and its spectral
        blocks. A layer whose sequence length is not known yet waits for :meth:`_relayout`."""
        sites: list[Any] = []
        waiting: list[Any] = []
        blocks: list[Any] = []
        for site in self._sites:
            try:
                _recurrent.ensure_site_variables(site, self._make_var)
                if site.sq is not None or site.prop is not None:
                    sites.append(site)
                    site.frozen = True
                else:
                    waiting.append(site)
                for block in _recurrent.spectral_blocks(site):
                    try:  # exact warm start when the kernel can be read now
                        w = np.asarray(block.kernel.numpy())[:, block.start : block.stop]
                        start, cold = _tensors.top_right_singular_vector(w), False
                    except Exception:  # noqa: BLE001 - still being initialised inside a trace
                        start = np.random.default_rng(0).standard_normal(block.stop - block.start).astype(np.float32)
                        start, cold = start / np.linalg.norm(start), True
                    block.vector = self._make_var(start, tf.float32, "gradwatch_power")
                    block.cold = self._make_var(cold, tf.bool, "gradwatch_power_cold")
                    block.second = self._make_var(_tensors.runner_up_start(start), tf.float32, "gradwatch_power_second")
                    blocks.append(block)
            except Exception as exc:  # noqa: BLE001 - profiling is optional
                self._fail("recurrent-layer profiling setup", exc)
                site.frozen = True
        self._sites = sites
        self.__dict__["_waiting_sites"] = waiting
        if self._host is not None:
            try:
                self._host.prepare(sites, blocks)  # (the callback starts the trace: HostProfile.warm_up)
            except Exception as exc:  # noqa: BLE001 - profiling is optional
                self._fail("recurrent-layer profiling setup", exc)
        return sites, blocks

    def _gate_hook(self, site: _recurrent.RecurrentSite) -> Any:
        """Forward-pass hook of a recurrent layer: on profiled steps, its propagation and
        gate statistics, replayed from what the call saw (:mod:`gradwatch_tf._propagation`)."""
        from gradwatch_tf._kreplay import site_salt
        from gradwatch_tf._propagation import ReplayHook

        def counters() -> tuple[tf.Variable, tf.Variable]:
            if self._ready:
                return self._graph.step_var, self._graph.active
            made = self.__dict__.get("_forward_counters")
            if made is None:  # the first traced forward pass of a model set up later
                with tf.init_scope():
                    made = (
                        self._make_var(self._monitor.next_step, tf.int64, "gradwatch_step"),
                        self._make_var(True, tf.bool, "gradwatch_active"),
                    )
                self.__dict__["_forward_counters"] = made
            return made

        return ReplayHook(
            site,
            make_var=self._make_var,
            counters=counters,
            profile_every=self._monitor.options.profile_every,
            salt=site_salt(site.layer),
            fail=lambda exc: self._fail("propagation replay", exc),
            disabled=lambda: self._closed or "propagation replay" in self._errors_logged,
            replay_every=self._monitor.options.replay_every,
            host=self._host,
        )

    def read_due(self, steps: int) -> bool:
        """Count ``steps`` optimizer steps run since the last read; True when the callback
        must read the ring now: a flush (``log_every``) or profiled step among them, a full
        ring, or ``on_nonfinite="raise"`` (which stops at once). TensorFlow decides skips
        and clips in graph, so no other step needs the host."""
        self._unread += max(int(steps), 1)
        opts = self._monitor.options
        if opts.on_nonfinite == "raise" or self._unread >= self._capacity:
            return True
        every = max(int(opts.log_every), 1)
        profiling = bool(self._ready and (self._graph.sites or self._graph.blocks))
        steps_now = range(self._last_step + 1, self._last_step + self._unread + 1)
        return any(s % every == 0 or (profiling and profile_due(s, opts.profile_every)) for s in steps_now)

    def sync_records(self) -> list[StepRecord]:
        self._unread = 0
        return super().sync_records()

    def _process_row(self, row: np.ndarray) -> StepRecord | None:
        host = self._host
        if host is not None:  # fit: a profiled row gets the profile measured for its step now
            profiled = self._graph.layout.slice("profiled")
            if profiled is not None and row[profiled][0] > 0:
                try:
                    row = host.fill(self._graph.layout, row, self._graph.sites, self._graph.blocks)
                except Exception as exc:  # noqa: BLE001 - the step's record goes on without it
                    host.broken.update(("replay", "spectral"))
                    self._fail("propagation replay", exc)
        return super()._process_row(row)

    # ------------------------------------------------------------ self-healing
    def _live(self) -> bool:
        return not self.lean and not self._stale()

    def lean_due(self, steps: int) -> bool:
        """Whether the callback may run the next ``steps`` optimizer steps (one Keras
        execution) with its lean train function: none of them is profiled, by the host's
        count (the last step read plus the steps run since, :meth:`read_due`), and there is
        something a lean trace leaves out (a recurrent layer or a spectral block).

        Why two traced functions: TensorFlow's graph is fixed when traced, so a profile
        decided in graph costs on every step: the sensitivity probe's gradient with respect
        to a recurrent layer's input is computed on every step (about a fifth of an LSTM's
        step) and the replay's and spectral loop's conditionals stay in the step. The lean
        function has none of it; the full one (traced first: it creates the probe variables)
        runs every execution that holds a profiled step, with the in-graph schedule as before.
        """
        if not (self._ready and self._full_traced) or self._closed or self._suspended:
            return False
        if not (self._graph.sites or self._graph.blocks):
            return False  # a lean trace would be the same step traced twice
        if self._last_step != self._monitor.next_step - 1:
            return False  # a row read but not recorded: the counts disagree
        first = self._last_step + self._unread + 1  # the device's next step, by the host's count
        every = self._monitor.options.profile_every
        return not any(profile_due(s, every) for s in range(first, first + max(int(steps), 1)))

    # ------------------------------------------------------------ in-graph step
    def _apply(self, grads: Any, trainable_variables: Any, original: Any) -> Any:
        if self._closed or self._stale():
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
        self._graph.lean = self.lean
        self._full_traced = self._full_traced or not self.lean
        try:
            build_step(self._graph, grads, tvars, original, self._after_row())
        except Exception as exc:
            if self._graph.reached_update:
                raise  # the optimizer's own error: not ours to hide, nor to retry
            self._fail("gradient measuring", exc)
            return original(grads, trainable_variables)
        return None

    # ------------------------------------------------------------------ protocol
    def close(self) -> None:
        if self._closed:
            return
        super().close()
        model = self._model_ref()
        if model is not None and self._mode == "watch":
            # A ``fit`` run while this watch was on traced gradwatch's wrapper into Keras'
            # cached functions. (The callback keeps its own traces apart: FitFunctions.)
            drop_traced_functions(model)

    def state_dict(self) -> dict[str, Any]:
        """Power-iteration vectors (the policy's state is the monitor's to save)."""
        if not self._ready:
            return dict(self._pending_state or {})
        if self._suspended and self._held_state is not None:
            return dict(self._held_state)
        blocks = self._graph.blocks
        out: dict[str, Any] = {"power": {b.name: [float(x) for x in b.vector.numpy()] for b in blocks}}
        cold = [b.name for b in blocks if b.cold is not None and bool(b.cold.numpy())]
        if cold:  # vectors not yet iterated: the next profiled step must iterate longer
            out["cold"] = cold
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self._ready:
            self._pending_state = dict(state)
            return
        if self._suspended and state == self._held_state and self._last_step == self._monitor.next_step - 1:
            return  # re-attached to the same watch, nothing loaded in between: already so
        for b in self._graph.blocks:
            vec = (state.get("power") or {}).get(b.name)
            if vec is not None and len(vec) == int(b.vector.shape[0]):
                b.vector.assign(np.asarray(vec, np.float32))
                b.cold.assign(b.name in (state.get("cold") or ()))
        # Re-align gradwatch's in-graph step counter with the (restored) monitor.
        self._graph.step_var.assign(self._monitor.next_step)
        self._graph.ring.assign(np.zeros([self._capacity, self._graph.layout.width]))
        self._last_step = self._monitor.next_step - 1
        self._held_state = None


def attach(model: Any, optimizer: Any | None, monitor: Any) -> TFAttachment:
    """Entry for ``gradwatch.watch``: intercept ``optimizer.apply`` for custom loops."""
    return TFAttachment(model, optimizer, monitor, mode="watch")
