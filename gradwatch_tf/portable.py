"""gradwatch for Keras 3 on JAX and PyTorch: the step written in ``keras.ops``.

What runs per optimizer step, inside the compiled step (``jax.jit`` on JAX, eager or
compiled torch), wrapped around ``optimizer.apply`` on the instance (JAX's
``stateless_apply`` runs ``apply`` inside a ``StatelessScope``; torch's train step calls
it directly):

1. squared norm and finiteness of each gradient (float32 maths, summed in the widest
   float the backend has), the global norm; on torch these, the row and the ring write
   are a few torch calls (:mod:`gradwatch_tf._kfast`: ``keras.ops`` dispatch per op was
   most of the step's overhead there);
2. the policy's decision: the core's own definitions (:mod:`gradwatch.policies`) run with
   :mod:`gradwatch_tf._kops` on state held in Keras variables (AGC unit-wise likewise);
3. the optimizer's own ``apply`` on the scaled gradients. With ``on_nonfinite`` "skip" or
   "raise" the update is computed and then every variable it may change (the model's
   trainable ones and the optimizer's, ``iterations`` included) is selected back to its
   value before the step when a gradient is not finite (``ops.where``: no branch, so it
   works unchanged under ``jax.jit``, where a ``cond`` around a stateful ``apply`` cannot
   be traced). The weights and the optimizer state are then bitwise as they were;
4. one row of the core's statistics layout into a ring buffer of ``capacity`` rows,
   indexed by gradwatch's step counter. The host reads it at each ``fit`` batch end, after
   each step of an eager custom loop, or when ``watch.records`` is read.

On JAX the variables a step changes must flow through the jitted function's state: during
a ``fit`` gradwatch's variables are appended to the optimizer's variables (so they travel
in ``model._jax_state["optimizer_variables"]``, where the callback reads the ring at batch
end, without a full state sync) and taken out again when the fit ends. A custom JAX loop
that calls ``optimizer.apply`` eagerly is watched as on torch; one that jits
``stateless_apply`` itself keeps gradwatch's state out of its own (not measured yet).

Through time (propagation gains, max gains, rate, horizon, gate statistics) comes from
the ``keras.ops`` replay (:mod:`gradwatch_tf._ksites`, :mod:`gradwatch_tf._kreplay`) on
the recurrent layers' kept call inputs and the weights before the update: in this hook on
torch and eager JAX, on the host at the read of the row under a JAX ``fit`` (the jitted
step only keeps what it needs in buffers, so its compile holds none of the replay). The
spectral norms of the recurrent kernels' gate blocks are computed on the host from the
kernels before the update, on profiled steps (:class:`gradwatch.through_time.spectral.HostSpectral`:
exact up to 64 units, Lanczos from the last profile's vector above). Per-timestep
sensitivity on torch comes from a gradient hook on the recurrent layers' inputs of profiled
steps (:meth:`gradwatch_tf._ksites.PortableThroughTime._probe`: the host knows which steps
those are, so no other step computes dL/dx); on JAX from an identity on those inputs whose
backward, traced in the same jitted step, hands its sums of squares to this step's row
(:meth:`gradwatch_tf._ksites.PortableThroughTime._tap`). That backward runs on every step; a
long ``fit`` runs the unprofiled ones with a lean train function without it
(:meth:`PortableAttachment.lean_due`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import HandleGroup, Layout, Segment, infer_layer, profile_due
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.records import StepRecord
from gradwatch_tf._kfast import torch_step
from gradwatch_tf._kops import KERAS_OPS, widest
from gradwatch_tf._ksites import PortableThroughTime
from gradwatch_tf._kstate import (
    DEFAULT_WATCH_CAPACITY,
    Graph,
    JaxState,
    PortablePolicy,
    Vars,
    clip,
    known_layers,
    traced,
)
from gradwatch_tf._lifecycle import Lifecycle
from gradwatch_tf._live import forget_bias_reader

__all__ = ["PortableAttachment", "attach"]

logger = logging.getLogger("gradwatch")


def _sq_and_finite(x: Any) -> tuple[Any, Any]:
    """The sum of squares of ``x`` (float32) and whether every element is finite, both
    exact. On JAX the squares are one dot product (BLAS: no kernel of its own to
    compile, and no float32 copy of a half-precision gradient) and finiteness a plain
    sum of ``x - x``, NaN exactly where an element is infinite or NaN (XLA keeps
    ``x - x`` for floating point: it is not 0 for those). XLA on CPU compiles each
    reduction into a few kernels of its own, boolean ones the slowest: for 56 gradients
    this compiled in 0.20 s instead of 0.38 s and ran in 8 ms instead of 10
    (``all(isfinite)`` and ``sum(square)``), the first ``fit`` of a watched JAX model
    being mostly that compile. (``x * 0`` did the same with one more kernel per
    gradient: XLA materialised a gradient-sized buffer of zeros for it, at every step.)
    Elsewhere ``keras.ops`` (this step runs on JAX; torch has :mod:`gradwatch_tf._kfast`,
    TensorFlow's ``fit`` its own graph, :mod:`gradwatch_tf._step`)."""
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        flat = jnp.ravel(x)
        sq = jnp.dot(flat, flat, preferred_element_type=jnp.float32)
        return sq, jnp.logical_not(jnp.isnan(jnp.sum(flat - flat)))
    return ops.sum(ops.square(ops.cast(x, "float32"))), ops.all(ops.isfinite(x))


#: On JAX, gradients of at most this many elements are measured together (:func:`_grad_stats`).
SMALL_NUMEL = 1 << 12


def _grad_stats(grads: list[Any]) -> tuple[Any, Any, list[int]]:
    """The sums of squares (float32) and finiteness (bool) of the gradients that are not
    None, as two vectors, and the gradient index of each entry: the stacked ones first,
    then the large ones (see :func:`_sq_and_finite` for the arithmetic).

    On JAX the small gradients (at most :data:`SMALL_NUMEL` elements: biases, norms'
    scales, small heads; two or more of them) are stacked, zero-padded, into one matrix
    reduced row by row: XLA on CPU compiles a reduction of a small tensor into two
    kernels of its own, and a scalar per gradient into one more where it joins the ring's
    row, so a model's many small gradients cost the first ``fit`` a few milliseconds of
    compile each (a watched LSTM's first ``fit`` on JAX: its train step compiled in 0.77 s
    instead of 0.80; with the kept buffers' and the ring's writes, 0.86 s before). Padding
    zeros change neither sum. The large ones are few, each measured in place."""
    numel = {j: int(np.prod(x.shape)) for j, x in enumerate(grads) if x is not None}
    small: list[int] = []
    if keras.backend.backend() == "jax":
        small = [j for j, n in numel.items() if 0 < n <= SMALL_NUMEL]
        small = small if len(small) >= 2 else []
    sqs: list[Any] = []
    oks: list[Any] = []
    if small:
        import jax.numpy as jnp

        width = max(numel[j] for j in small)
        rows = jnp.stack([jnp.pad(jnp.ravel(grads[j]).astype(jnp.float32), (0, width - numel[j])) for j in small])
        sqs.append(jnp.sum(rows * rows, axis=1))
        oks.append(jnp.logical_not(jnp.isnan(jnp.sum(rows - rows, axis=1))))
    stacked = set(small)
    large = [j for j in numel if j not in stacked]
    if large:
        stats = [_sq_and_finite(grads[j]) for j in large]
        sqs.append(ops.stack([ops.cast(sq, "float32") for sq, _ in stats]))
        oks.append(ops.stack([ok for _, ok in stats]))
    if not sqs:
        return ops.zeros((0,), "float32"), ops.zeros((0,), "bool"), []
    cat = (lambda xs: xs[0]) if len(sqs) == 1 else (lambda xs: ops.concatenate(xs, 0))
    return cat(sqs), cat(oks), small + large


class PortableAttachment(JaxState, Lifecycle):
    """gradwatch's live connection to a Keras model on JAX or PyTorch (see the module)."""

    backend = "keras"
    spectral_nan_unmeasured = True

    def __init__(
        self, model: Any, optimizer: Any | None, monitor: Any, *, mode: str = "watch", capacity: int | None = None
    ) -> None:
        self._model_ref = weakref.ref(model)
        self._monitor = monitor
        self._mode = mode
        # A fit reads the ring on flush and profiled steps only: room for the steps between.
        wanted = (
            min(max(int(monitor.options.log_every), 1), DEFAULT_WATCH_CAPACITY)
            if mode == "callback"
            else DEFAULT_WATCH_CAPACITY
        )
        self._capacity = (
            max(int(capacity or 1), wanted) if mode == "callback" else (int(capacity) if capacity else wanted)
        )
        #: The steps one host read follows: a fit's ``steps_per_execution`` (the callback's
        #: ``capacity``); a custom loop's watch reads after each step it is given.
        self._per_execution = int(capacity or 1) if mode == "callback" else 1
        self._handles = HandleGroup()
        self._wrappers: list[Callable[[], Callable[[], None]]] = []
        self._installed = False
        self._ready = False
        self._closed = False
        self._suspended = False
        self._opt_arg = optimizer
        self._errors_logged: set[str] = set()
        self._pending_state: Mapping[str, Any] | None = None
        self._vars = Vars()
        self._in_optimizer = False
        self._tt: PortableThroughTime | None = None
        self._host_step = 0
        self._unread = 0
        self._lean = False
        self._full_traced = False
        self.last_record: StepRecord | None = None
        self._last_step = 0
        self.outside_fit: Callable[[], bool] | None = None
        if optimizer is not None or getattr(model, "optimizer", None) is not None:
            self._install()

    # ------------------------------------------------------------------ install
    def _install(self) -> None:
        held = self._wrap_optimizer()
        if held is None:
            return
        model, self._outer = held
        self._tt = (
            PortableThroughTime(model, self._monitor.options, self._fail)
            if self._monitor.options.profile_every > 0
            else None
        )
        if self._tt is not None and self._tt.sites:
            self._tt.next_step = lambda: self._host_step if self._ready else None
            self._hold(self._tt.install)
        variables = list(getattr(model, "trainable_variables", []) or [])
        if variables:
            self._setup(variables)

    def _setup(self, variables: list[Any]) -> None:
        model = self._model_ref()
        known = known_layers(model) if model is not None else {}
        names = [v.path for v in variables]
        layers = [infer_layer(n, list(known)) for n in names]
        self._monitor.bind(names, layers)
        meta = self._monitor.meta
        meta.setdefault("layer_types", {layer: known[layer] for layer in dict.fromkeys(layers) if layer in known})
        meta.setdefault("backend", f"keras-{keras.backend.backend()}")
        meta.setdefault("keras", keras.__version__)
        policy = self._monitor.policy
        unitwise = policy if getattr(policy, "unitwise", False) else None
        make = self._vars.make
        device_policy = PortablePolicy(policy, make) if policy is not None and unitwise is None else None
        p = len(variables)
        segments = [Segment("step", 1), Segment("skipped", 1), Segment("profiled", 1)]
        if policy is not None:
            segments.append(Segment("clip", 2))
        segments += [Segment("sq_norms", p), Segment("nonfinite", p)]
        if unitwise is not None:
            segments.append(Segment("clipped_sq", p))
        segments += self._tt.segments() if self._tt is not None else []
        if self._tt is not None:
            for key, value in self._tt.meta().items():
                meta.setdefault(key, value)
            live = getattr(self._monitor, "live", None)
            if isinstance(live, dict) and self._tt.sites:  # the bias as it is when an alert is written
                live["forget_bias"] = forget_bias_reader(self._tt.sites, self._model_ref)
            if keras.backend.backend() == "jax" and self._tt.sites:
                self._tt.buffers(make, self._per_execution)
        layout = Layout(segments)
        self._graph = Graph(
            layout=layout,
            n_params=p,
            index={id(v): i for i, v in enumerate(variables)},
            path_index={v.path: i for i, v in enumerate(variables)},
            step_var=make(self._monitor.next_step, "int64", "gradwatch_step"),
            halted=make(False, "bool", "gradwatch_halted"),
            active=make(True, "bool", "gradwatch_active"),
            ring=make(np.zeros([self._capacity, layout.width]), "float64", "gradwatch_ring"),
            capacity=self._capacity,
            on_nonfinite=self._monitor.options.on_nonfinite,
            policy=device_policy,
            unitwise=unitwise,
        )
        self._step_slice = layout.slice("step")
        self._last_step = self._monitor.next_step - 1
        self._host_step = self._monitor.next_step
        if device_policy is not None:
            self._monitor.decide_on_device(device_policy)
        self._ready = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _read_ring(self) -> np.ndarray:
        ring = self._current(self._graph.ring)
        if ring is None:
            raise GradwatchError("gradwatch's ring buffer has no value")
        return np.asarray(ring, dtype=np.float64)

    def _after_row(self) -> Any:
        return None

    # ------------------------------------------------------------ self-healing
    # ------------------------------------------------------------ the step
    def _apply(self, grads: Any, trainable_variables: Any, original: Any) -> Any:
        if self._closed or self._stale():
            return original(grads, trainable_variables)
        grads = list(grads)
        tvars = list(trainable_variables) if trainable_variables is not None else list(self._opt._trainable_variables)
        if not self._ready:
            if grads and traced(grads[0]):
                self._fail(
                    "gradient measuring", GradwatchError("the model was not built before the first compiled step")
                )
                return original(grads, trainable_variables)
            try:
                self._setup(tvars)
            except Exception as exc:  # noqa: BLE001 - measuring is optional, the update is not
                self._fail("gradient measuring", exc)
                return original(grads, trainable_variables)
        if not getattr(self._opt, "built", True):
            self._opt.build(tvars)
        try:
            self._step(grads, tvars, original)
        except NonFiniteGradientError:
            raise
        except _UpdateError as exc:
            raise exc.__cause__ from None  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - the update has not happened yet
            self._fail("gradient measuring", exc)
            return original(grads, trainable_variables)
        return None

    def _step(self, grads: list[Any], tvars: list[Any], original: Callable[..., Any]) -> None:
        g = self._graph
        f = widest("float64")
        idx = [g.index.get(id(v), g.path_index.get(str(getattr(v, "path", "")))) for v in tvars]
        zero = ops.zeros((), f)
        fast = torch_step()  # torch: the same numbers in a few torch calls (_kfast)
        if fast is not None:
            per_sq_t, per_nf_t, norm, all_ok = fast.stats(grads, idx, g.n_params)
        else:
            sq_vec, ok_vec, order = _grad_stats(grads)
            sq_vec = ops.cast(sq_vec, f)
            all_ok = ops.all(ok_vec) if order else ops.convert_to_tensor(True)
            norm = ops.sqrt(ops.sum(sq_vec)) if order else zero
        active = g.active.value
        thr, scale, new_grads, per_clipped = clip(g, grads, tvars, idx, norm, active)
        step = g.step_var.value
        on_trace = traced(norm)
        if on_trace:
            self._full_traced = self._full_traced or not self._lean
        through_time = self._through_time(step, None if on_trace else self._host_step, active)
        # The update itself (everything that could fail in gradwatch's own maths is above).
        try:
            skipped = self._update(all_ok, active, new_grads, tvars, original)
        except Exception as exc:
            raise _UpdateError() from exc
        if g.on_nonfinite == "raise":
            g.halted.assign(ops.logical_or(g.halted.value, ops.logical_not(all_ok)))
        every = self._monitor.options.profile_every
        if fast is not None:
            parts: dict[tuple[str, str], Any] = {
                ("step", ""): step,
                ("skipped", ""): skipped,
                ("profiled", ""): fast.profiled(step, every) if through_time else zero,
                ("sq_norms", ""): per_sq_t,
                ("nonfinite", ""): per_nf_t,
            }
        else:
            # each parameter's entry, by one gather from the vectors (a parameter without a
            # gradient: the zero appended at their end)
            where = {j: k for k, j in enumerate(order)}
            pick = [len(order)] * g.n_params
            for j, pi in enumerate(idx):
                if pi is not None and j in where:
                    pick[pi] = where[j]
            nf_vec = ops.cast(ops.logical_not(ok_vec), f)
            parts = {
                ("step", ""): ops.cast(step, f),
                ("skipped", ""): ops.cast(skipped, f),
                ("profiled", ""): ops.cast(profile_due(step, every, KERAS_OPS), f) if through_time else zero,
                ("sq_norms", ""): ops.take(ops.concatenate([sq_vec, zero[None]], 0), np.asarray(pick, "int32"), axis=0),
                ("nonfinite", ""): ops.take(ops.concatenate([nf_vec, zero[None]], 0), np.asarray(pick, "int32"), axis=0),
            }
        if g.layout.slice("clip") is not None:
            parts[("clip", "")] = ops.stack([ops.cast(thr, f), ops.cast(scale, f)])
        if g.layout.slice("clipped_sq") is not None:
            parts[("clipped_sq", "")] = ops.stack(per_clipped) if per_clipped else ops.zeros((0,), f)
        parts.update(through_time)
        if fast is not None:
            fast.write(g.ring, g.step_var, step, g.layout.pack(parts, fast.concat), g.capacity)
        else:
            row = g.layout.pack(parts, lambda ts: ops.concatenate([ops.reshape(ops.cast(t, f), (-1,)) for t in ts], 0))
            slot = ops.mod(ops.cast(step, "int32") - 1, g.capacity)
            # (a dynamic slice update: the slot is in range by construction, so XLA needs
            # none of the bounds checks a scatter compiles into kernels of their own)
            g.ring.assign(ops.slice_update(g.ring.value, [slot, ops.zeros((), "int32")], ops.reshape(row, (1, -1))))
            g.step_var.assign(step + ops.ones((), keras.backend.standardize_dtype(g.step_var.dtype)))
        if not on_trace:
            self._host_step += 1
        if self._mode == "watch" and not on_trace and self.read_due(1):
            self.sync()

    @property
    def lean(self) -> bool:
        """True while the callback traces or runs its lean train function (JAX; see
        :meth:`lean_due`): the through-time sites then trace none of the profile."""
        return self._lean

    @lean.setter
    def lean(self, value: bool) -> None:
        self._lean = bool(value)
        if self._tt is not None:
            self._tt.lean = self._lean

    def lean_due(self, steps: int) -> bool:
        """Whether the callback may run the next ``steps`` optimizer steps (one Keras
        execution) with a lean train function: on JAX only, none of them profiled by the
        host's count, and the full trace had a recurrent layer reading data, whose
        sensitivity probe made the backward compute dL/dx on every step (a jitted step
        cannot branch its backward on the step number: :meth:`PortableThroughTime._tap`).
        The lean function has no probe and keeps nothing for the replay; its rows are the
        full one's on unprofiled steps. torch (eager) probes profiled steps only."""
        if keras.backend.backend() != "jax" or not (self._ready and self._full_traced):
            return False
        if self._closed or self._suspended or self._tt is None or not self._tt.anchored:
            return False
        if self._last_step != self._monitor.next_step - 1:
            return False  # a row read but not recorded: the counts disagree
        first = self._last_step + self._unread + 1  # the device's next step, by the host's count
        every = self._monitor.options.profile_every
        return not any(profile_due(s, every) for s in range(first, first + max(int(steps), 1)))

    def lean_saving(self) -> float:
        """The share of a step the lean train function is reckoned to save (JAX, from the
        probed layers' shapes: :meth:`PortableThroughTime.lean_saving`)."""
        return self._tt.lean_saving() if self._tt is not None else 0.0

    def read_due(self, steps: int) -> bool:
        """Count ``steps`` optimizer steps taken since the last read; True when the host
        must read the ring now: a flush (``log_every``) or profiled step among them, a
        full ring, or ``on_nonfinite="raise"`` (which stops at once). Other steps cost no
        host transfer."""
        self._unread += steps
        opts = self._monitor.options
        if opts.on_nonfinite == "raise" or self._unread >= self._capacity:
            return True
        every, profiling = max(int(opts.log_every), 1), self._tt is not None and bool(self._tt.sites)
        steps_now = range(self._last_step + 1, self._last_step + self._unread + 1)
        return any(s % every == 0 or (profiling and profile_due(s, opts.profile_every)) for s in steps_now)

    def sync_records(self) -> list[StepRecord]:
        self._unread = 0
        return super().sync_records()

    def _through_time(self, step: Any, host_step: int | None, active: Any) -> dict[tuple[str, str], Any]:
        """The recurrent layers' row entries (:mod:`gradwatch_tf._ksites`); a failure
        leaves them NaN for good, never the step."""
        tt = self._tt
        if tt is None or not tt.sites:
            return {}
        if not tt.broken:
            try:
                return tt.parts(step, host_step, active)
            except Exception as exc:  # noqa: BLE001 - measuring is optional
                tt.broken = True
                self._fail("propagation replay", exc)
        return tt.parts(step, host_step, active)

    def _process_row(self, row: np.ndarray) -> StepRecord | None:
        if self._tt is not None and self._tt.sites:
            profiled = self._graph.layout.slice("profiled")
            if keras.backend.backend() == "jax" and profiled is not None and row[profiled][0] > 0:
                row = self._tt.fill(self._graph.layout, row, self._live)
            row = self._tt.exp_logs(self._graph.layout, row)
        return super()._process_row(row)

    def _update(
        self, all_ok: Any, active: Any, grads: list[Any], tvars: list[Any], original: Callable[..., Any]
    ) -> Any:
        """The optimizer's own ``apply``; under "skip"/"raise" every variable it changes is
        selected back when a gradient is not finite. Returns whether it was skipped."""
        g = self._graph
        if g.on_nonfinite not in ("skip", "raise"):
            original(grads, tvars)
            return ops.convert_to_tensor(False)
        go = ops.logical_and(all_ok, ops.logical_not(g.halted.value))
        go = ops.logical_or(go, ops.logical_not(active))
        ours = {id(v) for v in self._vars.all}
        touched = list(tvars) + [v for v in self._outer.variables if id(v) not in ours]
        if self._outer is not self._opt:
            touched += [v for v in self._opt.variables if id(v) not in ours and all(v is not t for t in touched)]
        before = [ops.copy(v.value) for v in touched]
        original(grads, tvars)
        for v, old in zip(touched, before):
            v.assign(ops.where(go, v.value, old))
        return ops.logical_not(go)

    # ------------------------------------------------------------------ protocol
    def _leave(self) -> None:
        self.leave_optimizer()
        self._stand_aside()

    def state_dict(self) -> dict[str, Any]:
        return dict(self._pending_state or {}) if not self._ready else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self._ready:
            self._pending_state = dict(state)
            return
        if (
            self._last_step == self._monitor.next_step - 1
            and self._current(self._graph.step_var) is not None
            and int(self._current(self._graph.step_var)) == self._monitor.next_step
        ):
            return  # already aligned (re-attached to the same watch)
        g = self._graph
        g.step_var.assign(np.asarray(self._monitor.next_step).astype(keras.backend.standardize_dtype(g.step_var.dtype)))
        g.ring.assign(np.zeros([self._capacity, g.layout.width]).astype(keras.backend.standardize_dtype(g.ring.dtype)))
        self._last_step = self._monitor.next_step - 1
        self._host_step = self._monitor.next_step


class _UpdateError(Exception):
    """The optimizer's own ``apply`` raised: re-raised as it was, never retried."""


def attach(model: Any, optimizer: Any | None, monitor: Any) -> PortableAttachment:
    """Entry for ``gradwatch.watch`` on JAX / torch: intercept ``optimizer.apply``."""
    return PortableAttachment(model, optimizer, monitor, mode="watch")
