"""The in-graph step: what runs inside the user's traced step, once per optimizer update.

How a step flows (all of it inside the user's ``tf.function``, under XLA too):

1. Under a distribution strategy the gradients are still per replica: they are summed
   across replicas (one all-reduce, together with the per-timestep probe sums) for
   measuring only; the replicas' own gradients go on to Keras, which reduces them again.
2. Squared norms, non-finite flags, the policy's decision (the core's own policy
   definition run with TensorFlow ops, state in ``tf.Variable``\\ s: :class:`DevicePolicy`),
   clipping (one scale, or the unit-wise factors of AGC), then the original ``apply``,
   inside ``tf.cond`` when ``on_nonfinite`` is "skip" or "raise", so a bad step changes
   neither weights nor optimizer state nor ``iterations``.
3. On profiled steps: the largest singular value of each recurrent gate block
   (:func:`gradwatch_tf._tensors.power_iteration`, iterated to a tolerance), and what the
   recurrent layers' forward hooks measured in this step's forward pass (propagation and
   gate statistics, :mod:`gradwatch_tf._propagation`); a layer the step did not replay
   sends NaN, which the host leaves out. In ``fit`` both are measured beside the step
   instead, from what profiled steps keep (:mod:`gradwatch_tf._tfhost`): the row carries
   NaN there and the host fills it in when it reads the row.
4. One float64 row in the core's statistics layout (:class:`gradwatch.Layout`) goes into
   a ring buffer of ``capacity`` rows, indexed by gradwatch's own step counter, so
   ``steps_per_execution = k`` loses no step; the host reads it (``attach.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch import Layout, Segment, profile_due
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.policies import ClipStats
from gradwatch_tf import _tensors
from gradwatch_tf._ops import TF

__all__ = ["DevicePolicy", "GraphContext", "build_step", "step_layout"]

F64 = tf.float64


class DevicePolicy:
    """Runs a core policy (:mod:`gradwatch.policies`) inside the graph and owns its state.

    One ``tf.Variable`` per field of the policy's state dataclass; ``state_dict`` /
    ``load_state_dict`` use the policy's own format, so the host and the device share
    one state layout and hand it over when the watch attaches or detaches.
    """

    def __init__(self, policy: Any, make_var: Callable[..., tf.Variable]) -> None:
        self.policy = policy
        init = policy.init()
        self._cls = type(init)
        self._vars: dict[str, tf.Variable] = {}
        for f in dataclasses.fields(init):
            arr = np.asarray(getattr(init, f.name))
            self._vars[f.name] = make_var(arr, tf.as_dtype(arr.dtype), f"gradwatch_{policy.name}_{f.name}")
        try:  # a policy that cannot run on TF ops in a graph fails here, loudly, not silently later
            with tf.init_scope():

                def trial() -> tf.Tensor:
                    clip, _ = self.policy.update(ClipStats(tf.constant(1.0, F64)), self._read(), TF)
                    return tf.stack([tf.cast(clip.threshold, F64), tf.cast(clip.scale, F64)])

                tf.function(trial, autograph=False).get_concrete_function()
        except Exception as exc:
            raise GradwatchError(
                f"policy {policy!r} cannot run inside the TensorFlow graph: {type(exc).__name__}: {exc}. A policy must "
                "use only the ArrayOps it is given (see gradwatch.policies)."
            ) from exc

    def _read(self) -> Any:
        return self._cls(**{k: v.read_value() for k, v in self._vars.items()})

    def run(self, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(threshold, scale) as float64 scalars; the state variables are updated."""
        clip, new = self.policy.update(ClipStats(norm), self._read(), TF)
        assigns = [v.assign(tf.cast(getattr(new, k), v.dtype)) for k, v in self._vars.items()]
        with tf.control_dependencies(assigns):
            return tf.identity(tf.cast(clip.threshold, F64)), tf.identity(tf.cast(clip.scale, F64))

    def state_dict(self) -> dict[str, Any]:
        return self.policy.dump_state(self._cls(**{k: v.numpy() for k, v in self._vars.items()}))  # type: ignore[no-any-return]

    def load_state_dict(self, state: Any) -> None:
        st = self.policy.load_state(state)
        for k, v in self._vars.items():
            v.assign(np.asarray(getattr(st, k)))


def step_layout(policy: Any, n_params: int, sites: list[Any], blocks: list[Any]) -> Layout:
    """The row of one step: the core's segments for what this model has (the recurrent
    layers' per-timestep norms, spectral norms, gate statistics and propagation gains)."""
    p = n_params
    segments = [Segment("step", 1), Segment("skipped", 1), Segment("profiled", 1)]
    if policy is not None:
        segments.append(Segment("clip", 2))
    segments += [Segment("sq_norms", p), Segment("nonfinite", p)]
    if getattr(policy, "unitwise", False):
        segments.append(Segment("clipped_sq", p))
    segments += [Segment("temporal", int(s.sq.shape[0]), key=s.name) for s in sites if s.sq is not None]
    segments += [Segment("spectral", 1, key=b.name, labels=(b.name,)) for b in blocks]
    segments += [Segment("gates", 2, key=s.name, labels=(s.gate_name or "",)) for s in sites if s.gate_stats is not None]
    for kind in ("propagation", "max_gains"):  # log gains / log max gains: prop[0] and prop[1]
        segments += [Segment(kind, int(np.prod(s.prop.shape[1:])), key=s.name, labels=s.recurrences) for s in sites if s.prop is not None]
    return Layout(segments)


@dataclass
class GraphContext:
    """What the in-graph step needs, created once when the watch is set up."""

    layout: Layout
    n_params: int
    index: dict[int, int]  # id(variable) -> bound position
    path_index: dict[str, int]  # variable path -> bound position (traced copies)
    step_var: tf.Variable
    halted: tf.Variable  # set by a non-finite step under "raise" until the host has seen it
    active: tf.Variable  # False after close: an already traced step stands aside
    ring: tf.Variable
    capacity: int
    on_nonfinite: str
    profile_every: int
    policy: DevicePolicy | None = None
    unitwise: Any = None  # the core AGC policy (unit_factor / decision)
    sites: list[Any] = field(default_factory=list)
    blocks: list[Any] = field(default_factory=list)
    fail: Callable[[str, BaseException], None] = lambda part, exc: None
    profile_ok: bool = True
    reached_update: bool = False
    #: Called once while the first step is traced (layers whose sequence length only the
    #: traced step shows join the layout); None when there is nothing to wait for.
    relayout: Callable[[], None] | None = None
    #: Read while a step is traced: True for the *lean* train function the callback runs
    #: when none of an execution's steps is profiled (:meth:`TFAttachment.lean_due`). Its
    #: trace holds no profile at all: no spectral loop, no reads of the probes, the row's
    #: ``profiled`` flag a constant 0 (the host then reads none of the per-layer segments).
    lean: bool = False
    #: ``fit``: a :class:`gradwatch_tf._tfhost.HostProfile`. Profiled steps keep what the
    #: profile needs; the host measures it when it reads the row (None: in graph).
    host: Any = None


def _measure(
    c: GraphContext, ctx: Any, replicas: int, grads: list[Any], lean: bool = False
) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The gradients to measure (all-reduced across replicas), the probe sums, the gate
    statistics and the log propagation gains of the forward hooks (none when ``lean``)."""
    sites = [] if lean else c.sites
    temporal = [site.sq.read_value() for site in sites if site.sq is not None]
    gates = [site.gate_stats.read_value() for site in sites if site.gate_stats is not None]
    logs = [site.prop.read_value() for site in sites if site.prop is not None]
    measured = list(grads)
    if replicas > 1:
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, dense + temporal + gates + logs)
        for k, i in enumerate(present):
            measured[i] = reduced[k]
        nt, ng = len(temporal), len(gates)
        temporal = list(reduced[len(dense) : len(dense) + nt])
        # Gate statistics are means over each replica's equal share: average them.
        gates = [g / replicas for g in reduced[len(dense) + nt : len(dense) + nt + ng]]
        # Log gains: the mean over replicas of each one's median (a geometric mean); log max
        # gains: the max over every replica's sequences, gathered.
        logs = [
            tf.stack([v[0] / replicas, tf.reduce_max(ctx.all_gather(own[1][None], axis=0), axis=0)])
            for v, own in zip(reduced[len(dense) + nt + ng :], logs)
        ]
    return measured, temporal, gates, logs


def _clip(c: GraphContext, grads: list[Any], measured: list[Any], tvars: list[Any], idx: list[Any], norm: tf.Tensor, active: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list[Any], list[tf.Tensor]]:
    """The policy's threshold and scale, the gradients to apply, AGC's clipped norms."""
    zero = tf.constant(0.0, F64)
    if c.unitwise is not None:
        pol = c.unitwise
        new_grads: list[Any] = []
        per_clipped: list[tf.Tensor] = [zero] * c.n_params
        after_each = []
        for j, (g, m, v) in enumerate(zip(grads, measured, tvars)):
            if g is None:
                new_grads.append(g)
                after_each.append(zero)
                continue
            # IndexedSlices (embeddings): repeated rows summed, not densified; the rows
            # absent from the slices are zero and change no unit's norm.
            m = _tensors.summed_rows(m) if isinstance(m, tf.IndexedSlices) else tf.convert_to_tensor(m)
            value = v.value if hasattr(v, "value") else v
            factor = pol.unit_factor(_tensors.unitwise_norm(value), _tensors.unitwise_norm(m), TF)
            factor = tf.where(active, factor, tf.ones_like(factor))
            new_grads.append(_tensors.scale(g, factor))
            a = _tensors.squared_norm(tf.cast(m, tf.float32) * factor)
            after_each.append(a)
            if idx[j] is not None:
                per_clipped[idx[j]] = a
        clip = pol.decision(norm, tf.sqrt(tf.add_n(after_each)), TF)
        return tf.cast(clip.threshold, F64), tf.cast(clip.scale, F64), new_grads, per_clipped
    if c.policy is not None:
        thr, scale = c.policy.run(norm)
        scale = tf.where(active, scale, tf.ones_like(scale))
        return thr, scale, [_tensors.scale(g, scale) if g is not None else g for g in grads], []
    return tf.constant(np.nan, F64), tf.constant(1.0, F64), grads, []


def _spectral(c: GraphContext, profiled: tf.Tensor, step: tf.Tensor) -> list[tf.Tensor]:
    """Largest singular value of each gate block, on profiled steps (zeros otherwise),
    iterated to a tolerance (:func:`spectral_sigmas`). In ``fit`` (``c.host``) the step
    only keeps the kernels on profiled steps and sends NaN: the host measures them
    (:mod:`gradwatch_tf._tfhost`)."""
    if not c.blocks:
        return []
    zeros = tf.zeros([len(c.blocks)], F64)
    if not c.profile_ok:
        return [zeros]
    try:
        blocks = c.blocks
        if c.host is not None:
            host = c.host
            slot = host.slot(step, c.profile_every)
            tf.cond(profiled, lambda: host.keep_kernels(blocks, step, slot), lambda: tf.constant(False))
            return [tf.fill([len(blocks)], tf.constant(np.nan, F64))]

        def compute() -> tf.Tensor:
            return spectral_sigmas(blocks, lambda b: tf.convert_to_tensor(b.kernel.value if hasattr(b.kernel, "value") else b.kernel))

        return [tf.cond(profiled, compute, lambda: zeros)]
    except Exception as exc:  # noqa: BLE001 - spectral norms are optional
        c.fail("spectral norms", exc)
        c.profile_ok = False
        return [zeros]


def spectral_sigmas(blocks: list[Any], kernel_of: Callable[[Any], tf.Tensor]) -> tf.Tensor:
    """sigma_max of each block (float64 [len(blocks)]) of the kernels ``kernel_of(block)``
    gives, warm-started from and writing back each block's vectors. Blocks of one shape
    (an LSTM's four gates) share one batched loop."""
    ws = [kernel_of(b)[:, b.start : b.stop] for b in blocks]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, w in enumerate(ws):
        groups.setdefault((tuple(w.shape), w.dtype), []).append(j)
    sigmas: list[Any] = [None] * len(blocks)
    for idx in groups.values():
        chosen = [blocks[j] for j in idx]
        if len(idx) == 1:
            found = [_tensors.power_iteration(ws[idx[0]], chosen[0].vector, getattr(chosen[0], "second", None))]
        else:
            seconds = [getattr(b, "second", None) for b in chosen]
            found = _tensors.power_iterations([ws[j] for j in idx], [b.vector for b in chosen], seconds)
        for j, sigma in zip(idx, found):
            sigmas[j] = sigma
    for b, sigma in zip(blocks, sigmas):
        if b.cold is not None:  # the vector has now been iterated to convergence
            with tf.control_dependencies([sigma]):
                b.cold.assign(False)
    return tf.stack([tf.cast(sigma, F64) for sigma in sigmas])


def _replayed(c: GraphContext, step: tf.Tensor, gates: list[Any], logs: list[Any]) -> tuple[list[Any], list[Any]]:
    """Gate statistics and propagation gains (float64) of the sites replayed for this very
    step; NaN for the others (the host leaves those out)."""
    nan = tf.constant(np.nan, F64)
    fresh = {id(site): tf.equal(site.prop_step.read_value(), step) for site in c.sites if site.prop_step is not None}
    out_gates = []
    for site, g in zip([s for s in c.sites if s.gate_stats is not None], gates):
        ok = fresh.get(id(site), tf.constant(False))
        out_gates.append(tf.where(ok, tf.cast(g, F64), nan))
    out_logs = []
    for site, v in zip([s for s in c.sites if s.prop is not None], logs):
        out_logs.append(tf.where(fresh[id(site)], tf.exp(tf.cast(v, F64)), nan))  # [2, R, T]
    return out_gates, out_logs


def _apply(c: GraphContext, ctx: Any, replicas: int, all_ok: tf.Tensor, active: tf.Tensor, grads: list[Any], tvars: Any, original: Callable[..., Any]) -> tf.Tensor:
    """Run the optimizer's own ``apply``; under "skip"/"raise" only when every gradient is
    finite. Returns whether the update was skipped."""
    c.reached_update = True
    if c.on_nonfinite not in ("skip", "raise"):
        original(grads, tvars)
        return tf.constant(False)
    go = tf.logical_and(all_ok, tf.logical_not(c.halted.read_value()))
    go = tf.logical_or(go, tf.logical_not(active))

    def do_apply() -> tf.Tensor:
        original(grads, tvars)
        return tf.constant(True)

    if replicas > 1:
        _cond_apply_distributed(ctx, go, grads, tvars, original)
    else:
        tf.cond(go, do_apply, lambda: tf.constant(False))
    return tf.logical_not(go)


def build_step(c: GraphContext, grads: list[Any], tvars: list[Any], original: Callable[..., Any], after: Callable[[tf.Tensor], None] | None = None) -> None:
    """Add one step's ops to the graph being traced (or run them, when eager).

    ``after(row)`` runs once the row is in the ring (the host callback of a watch).
    """
    if c.relayout is not None:
        try:
            c.relayout()
        except Exception as exc:  # noqa: BLE001 - those layers then stay unprofiled
            c.relayout = None
            c.fail("recurrent-layer profiling setup", exc)
    idx = [c.index.get(id(v), c.path_index.get(str(getattr(v, "path", "")))) for v in tvars]
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    lean = c.lean
    measured, temporal, gates, logs = _measure(c, ctx, replicas, grads, lean)
    zero = tf.constant(0.0, F64)
    sq_each, fin_each = _tensors.grad_stats(measured)
    all_ok = tf.reduce_all(tf.stack(fin_each)) if fin_each else tf.constant(True)
    norm = tf.sqrt(tf.add_n(sq_each) if sq_each else zero)
    per_sq: list[tf.Tensor] = [zero] * c.n_params
    per_nf: list[tf.Tensor] = [zero] * c.n_params
    for j, pi in enumerate(idx):
        if pi is not None:
            per_sq[pi] = sq_each[j]
            per_nf[pi] = tf.cast(tf.logical_not(fin_each[j]), F64)
    active = c.active.read_value()
    thr, scale, new_grads, per_clipped = _clip(c, grads, measured, tvars, idx, norm, active)
    step = c.step_var.read_value()
    profiled = profile_due(step, c.profile_every, TF) if (c.sites or c.blocks) and not lean else tf.constant(False)
    if lean:  # zeros of the per-layer segments' shapes: the host reads none (profiled is 0)
        spectral = [tf.zeros([len(c.blocks)], F64)] if c.blocks else []
        temporal = [tf.zeros(site.sq.shape, tf.float32) for site in c.sites if site.sq is not None]
        gates = [tf.zeros([2], F64) for site in c.sites if site.gate_stats is not None]
        gains = [tf.zeros(site.prop.shape, F64) for site in c.sites if site.prop is not None]
    else:
        spectral = _spectral(c, profiled, step)
        gates, gains = _replayed(c, step, gates, logs)
    # The update itself. Everything that could fail is built above this point, so a
    # failure never leaves a half-built step that applies the gradients twice.
    skipped = _apply(c, ctx, replicas, all_ok, active, new_grads, tvars, original)
    try:
        if c.on_nonfinite == "raise":
            c.halted.assign(tf.logical_or(c.halted.read_value(), tf.logical_not(all_ok)))
        parts: dict[tuple[str, str], Any] = {
            ("step", ""): tf.cast(step, F64),
            ("skipped", ""): tf.cast(skipped, F64),
            ("profiled", ""): tf.cast(profiled, F64),
            ("sq_norms", ""): tf.stack(per_sq) if per_sq else tf.zeros([0], F64),
            ("nonfinite", ""): tf.stack(per_nf) if per_nf else tf.zeros([0], F64),
        }
        if c.layout.slice("clip") is not None:
            parts[("clip", "")] = tf.stack([thr, scale])
        if c.layout.slice("clipped_sq") is not None:
            parts[("clipped_sq", "")] = tf.stack(per_clipped) if per_clipped else tf.zeros([0], F64)
        for site, sq in zip([s for s in c.sites if s.sq is not None], temporal):
            parts[("temporal", site.name)] = sq
        for k, block in enumerate(c.blocks):
            parts[("spectral", block.name)] = spectral[0][k]
        for site, g in zip([s for s in c.sites if s.gate_stats is not None], gates):
            parts[("gates", site.name)] = g
        for site, v in zip([s for s in c.sites if s.prop is not None], gains):
            parts[("propagation", site.name)] = v[0]
            parts[("max_gains", site.name)] = v[1]
        row = c.layout.pack(parts, lambda ts: tf.concat([tf.reshape(tf.cast(t, F64), [-1]) for t in ts], 0))
        slot = tf.reshape(tf.math.floormod(step - 1, c.capacity), [1, 1])
        if replicas > 1:
            # assign of the whole ring rather than scatter: sync-on-read variables
            # (distribution strategies) implement assign only.
            c.ring.assign(tf.tensor_scatter_nd_update(c.ring.read_value(), slot, tf.reshape(row, [1, -1])))
        else:  # one row in place: the ring holds log_every rows in a fit
            c.ring.scatter_nd_update(slot, tf.reshape(row, [1, -1]))
        c.step_var.assign_add(1)
        if after is not None:
            after(row)
    except NonFiniteGradientError:
        raise  # on_nonfinite="raise", read eagerly: the update was skipped in-graph
    except Exception as exc:  # noqa: BLE001 - the update above has happened; only recording fails
        c.fail("recording gradient statistics", exc)


def _cond_apply_distributed(ctx: Any, go: tf.Tensor, grads: list[Any], tvars: Any, original: Callable[..., Any]) -> None:
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

