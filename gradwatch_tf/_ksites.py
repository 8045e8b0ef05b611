"""Through time on JAX and torch Keras: where the portable step gets its propagation.

The recurrent layers (SimpleRNN / LSTM / GRU, ``RNN`` of one of their cells, and
``Bidirectional`` around one: a site with recurrences "l0" and "l0_reverse") have their
``call`` wrapped on the instance (restored at close), which only *keeps* what the call
saw: input, mask, initial state. The replay (:func:`gradwatch_tf._kreplay.measure`) runs
on the weights the gradients belong to (before the update):

* on JAX the jitted train step holds none of the replay (its scans would be compiled into
  the step: a first ``fit`` 6x slower for one small LSTM). The forward ran inside
  ``jax.value_and_grad`` in the same trace, so the kept tensors are that transform's
  tracers; their primal values are the jitted step's own. On a due step the step copies
  the first ``PROBED`` sequences (input, mask, initial state) and the cells' weights
  before the update into device buffers (:class:`Kept`) that travel in its state like
  the ring, in a slot of its own (one per profiled step an execution of
  ``steps_per_execution`` steps can hold); when the host reads that step's row (the
  callback reads after every execution with a profiled step) it replays the buffers with
  a separately jitted function and writes the logs into the row, so the record carries
  them with its own step number. That function is compiled
  once per site and probed batch size, in a background thread started at the first
  profiled step (:mod:`gradwatch_tf._kkept`): the fit goes on meanwhile, and profiled
  steps read before it is ready are replayed on numpy (:mod:`gradwatch_tf._knumpy`, the
  same replay code); a fit with fewer than ``_kkept.BACKGROUND_MIN_STEPS`` steps left (the
  callback's count, ``steps_left``) compiles nothing and replays on numpy. The
  host waits for the replay itself (a few small scans over 8 sequences, on profiled
  steps only); it is not left to land at a later read. A due step whose slot was
  overwritten before the host read it (a ``watch`` in a jitted custom loop whose records
  are read only later: it has one slot) is likewise not measured;
* on torch (eager), and in an eager JAX custom loop, the kept tensors are detached, and
  the host knows the step count, so an unprofiled step runs nothing of it (no device read
  to decide), a due one replays in the hook before the update.

Sensitivity (dL/dx of each site's input, summed in squares per timestep): on torch a hook on
profiled steps' inputs; on JAX an identity whose backward leaves its sums in the site, read
into the row by the optimizer step traced after it (:meth:`PortableThroughTime._tap`).

A diagonal recurrence (mingru-keras' ``MinGRU``, :mod:`gradwatch_tf._kdiag`) is a site with
no cell: nothing kept or replayed; its log gains come from its decays in the step itself, on
profiled steps (eagerly when the host knows the step, under ``ops.cond`` in a jitted one).

Each site's row entries are the log gains [2, R, T] (the host takes ``exp`` in float64:
a vanished gain stays representable in float32) and, for gated cells, the keep gate's
statistics; NaN where the site was not replayed for this step, which the host leaves out.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import Segment, profile_due
from gradwatch.options import profiled_ordinal
from gradwatch.through_time.fit import aggregate_logs
from gradwatch.through_time.plan import PROBED, replay_every
from gradwatch.through_time.spectral import HostSpectral
from gradwatch_tf import _kcells, _kdiag, _kkept, _knumpy, _kreplay
from gradwatch_tf._kkept import Kept, KeptHost
from gradwatch_tf._kops import KERAS_OPS, KERAS_TENSORS, widest
from gradwatch_tf._live import site_forget_bias

__all__ = ["PortableThroughTime"]

_GATES = {"LSTMCell": "forget", "GRUCell": "update"}


@dataclass
class _Block:
    """One gate block of a recurrent kernel: columns ``start:stop``, named as TensorFlow
    names it (``<kernel path>[f]``; a SimpleRNN's kernel without a suffix)."""

    name: str
    kernel: Any
    start: int
    stop: int


def _blocks(directions: list[tuple[str, Any]]) -> list[_Block]:
    return [_Block(*block) for block in _kcells.gate_blocks([layer.cell for _, layer in directions])]


@dataclass
class _Site:
    layer: Any
    name: str
    length: int
    directions: list[tuple[str, Any]]
    salt: int
    call: dict[str, Any] = field(default_factory=dict)  # what the last call kept
    kept: Kept | None = None  # JAX: the device buffers of the due steps an execution holds
    blocks: list[_Block] = field(default_factory=list)  # the recurrent kernels' gate blocks
    sq: Any = None  # per-timestep sums of squares of dL/dx of this step (sensitivity; torch, JAX)
    tap: Any = None  # JAX: the identity whose backward hands dL/dx's sums of squares to ``sq``
    #: A diagonal recurrence (:mod:`gradwatch_tf._kdiag`): measured in the step from its
    #: decays, nothing kept or replayed; None for the cells' layers.
    diag: _kdiag.Diagonal | None = None

    @property
    def weights(self) -> list[Any]:
        if self.diag is not None:
            return self.diag.weights(self.layer)
        return [v for _, layer in self.directions for v in layer.cell.weights]

    @property
    def numpy_ok(self) -> bool:
        """Its host replay can run on numpy (:func:`gradwatch_tf._knumpy.replayable`)."""
        return self.diag is None and _knumpy.replayable(self.directions)

    @property
    def gate_name(self) -> str | None:
        if self.diag is not None:
            return None  # (no gate statistics: the decay is the whole story)
        names = {_GATES.get(type(layer.cell).__name__) for _, layer in self.directions}
        return names.pop() if len(names) == 1 else None


def _length(layer: Any) -> int | None:
    try:
        shape = layer.input.shape
    except Exception:  # noqa: BLE001 - not called symbolically: try the build shapes
        try:
            shape = next(iter(layer._build_shapes_dict.values()))
        except Exception:  # noqa: BLE001
            return None
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    return int(shape[1]) if len(shape) > 2 and shape[1] is not None else None


def _walk(layer: Any) -> list[Any]:
    out = []
    for sub in getattr(layer, "_layers", []) or []:
        out += [sub, *_walk(sub)]
    return out


def _known_cell(layer: Any) -> bool:
    return isinstance(layer, keras.layers.RNN) and type(getattr(layer, "cell", None)).__name__ in _kcells.KCELLS


def find_sites(model: Any) -> list[_Site]:
    sites, inner = [], set()
    layers = _walk(model)
    for layer in layers:
        if isinstance(layer, keras.layers.Bidirectional):
            subs = [("l0", layer.forward_layer), ("l0_reverse", layer.backward_layer)]
            inner.update(id(s) for _, s in subs)
            if all(_known_cell(s) for _, s in subs):
                sites.append((layer, subs))
    sites += [(layer, [("l0", layer)]) for layer in layers if id(layer) not in inner and _known_cell(layer)]
    out = []
    for layer, directions in sites:
        n = _length(layer)
        if n is not None and n >= 1:
            site = _Site(layer, layer.path, n, directions, _kreplay.site_salt(layer))
            site.blocks = _blocks(directions)
            out.append(site)
    taken = {id(layer) for layer, _ in sites} | inner
    plugins = _kdiag.plugin_declarations()
    for layer in layers:  # diagonal recurrences (mingru-keras' MinGRU, declared layers)
        diag = _kdiag.diagonal_of(layer, plugins) if id(layer) not in taken else None
        n = _length(layer) if diag is not None else None
        if diag is not None and n is not None and n >= 2:
            out.append(_Site(layer, layer.path, n, [("l0", layer)], _kreplay.site_salt(layer), diag=diag))
    return out


def _training(named: dict[str, Any]) -> bool:
    """Is this call a training one: its ``training`` argument, or for a layer whose
    ``call`` takes none (mingru-keras' MinGRU) the value Keras resolved for the call."""
    if "training" in named:
        return bool(named.get("training"))
    try:
        from keras.src.backend.common import global_state

        ctx = global_state.get_global_attribute("current_call_ctx")
        return bool(getattr(ctx, "training", False))
    except Exception:  # noqa: BLE001 - another Keras: treated as not training
        return False


def _primal(x: Any) -> Any:
    """The value a tensor of the forward has outside the gradient transform: a JAX
    linearize / JVP tracer's primal (a tracer of the jitted step, or an array), a torch
    tensor detached; anything else as it is."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_primal(v) for v in x]
    while hasattr(x, "primal") and type(x).__module__.startswith("jax"):
        x = x.primal
    return x.detach() if hasattr(x, "detach") and keras.backend.backend() == "torch" else x


def _as_list(v: Any) -> list[Any]:
    """A dropout mask (or its buffer) as a list: [] for none, one per gate, or [it]."""
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _has_tangent(x: Any) -> bool:
    """True for a JAX tensor the gradient transform differentiates (a linearize / JVP
    tracer, which carries its ``primal``); False for data."""
    return hasattr(x, "primal") and type(x).__module__.startswith("jax")


def _trace_of(x: Any) -> Any:
    """The JAX trace a tracer belongs to (None for an array or another backend)."""
    return getattr(x, "_trace", None) if type(x).__module__.startswith("jax") else None


@functools.cache
def _torch_tap() -> Any:
    """``Tap.apply(x, anchor) -> x`` (torch), an ``autograd.Function`` whose backward
    passes dL/dx on and gives the anchor (a weight) no gradient at all (None: nothing is
    accumulated into it)."""
    import torch

    class Tap(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, anchor: Any) -> Any:  # the anchor only ties x to the graph
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, None]:
            return g, None

    return Tap


def _jax_tap(site: _Site) -> Any:
    """The identity ``tap(x, anchor) -> x`` of :meth:`PortableThroughTime._tap`, whose
    backward adds ``sum over batch and features of (dL/dx)^2`` (float32, one number per
    timestep) to ``site.sq`` and returns ``dL/dx`` unchanged and no cotangent for the
    anchor (a symbolic zero: the anchor's gradient is untouched, bitwise)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def tap(x: Any, anchor: Any) -> Any:
        return x

    def fwd(x: Any, anchor: Any) -> tuple[Any, None]:
        return x, None

    def bwd(_: None, g: Any) -> tuple[Any, None]:
        sq = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=(0, 2))
        held = site.sq
        # a layer called twice in one step adds up, as on torch; a stale one (another
        # trace) is replaced
        site.sq = sq if held is None or _trace_of(held) is not _trace_of(sq) else held + sq
        return g, None

    tap.defvjp(fwd, bwd)
    return tap


class PortableThroughTime:
    """The propagation of a model's recurrent layers in the portable step (see module)."""

    def __init__(self, model: Any, options: Any, fail: Callable[[str, BaseException], None]) -> None:
        self.sites = find_sites(model)
        self._every = int(options.profile_every)
        self._replay_every = options.replay_every
        self._fail = fail
        self.broken = False
        self._jitted: dict[str, tuple[list[Any], Any]] = {}
        self._compiled: dict[tuple[str, int], Any] = {}  # JAX host replays: compiled, or a Future
        self._rent: dict[Any, float] = {}  # key -> seconds of numpy replays (_kkept.NUMPY_RENT_S)
        self._spectral = HostSpectral()  # sigma_max of the kernels' gate blocks, on the host
        self.spectral_broken = False
        self._nan_cache: dict[tuple[Any, str], Any] = {}
        #: torch: the step the next forward belongs to (the attachment's count), so a
        #: profiled one probes the layers' inputs (:meth:`_probe`); None elsewhere.
        self.next_step: Callable[[], int | None] = lambda: None
        self.sensitivity = keras.backend.backend() in ("torch", "jax")
        self.broken_sensitivity = False
        #: JAX: sites whose probe tied a data input to a weight (the backward computes
        #: dL/dx on every step of that trace, for the probe alone), with the share of the
        #: layer's training work that costs (:meth:`lean_saving`).
        self.anchored: dict[str, float] = {}
        #: JAX: the trace under way is the callback's lean train function: no probe, no kept
        #: buffers (every step it runs is unprofiled); set by the attachment.
        self.lean = False
        #: JAX ``fit``: the steps left when the host read the last rows (the callback's
        #: count; None: unknown). A short fit compiles no replay: it replays on numpy (:meth:`fill`).
        self.steps_left: int | None = None

    def meta(self) -> dict[str, Any]:
        kinds, biases = {}, {}
        for s in self.sites:
            if s.diag is not None:
                kinds[s.name] = s.diag.kind
                continue
            cell = s.directions[0][1].cell
            name = type(cell).__name__
            kinds[s.name] = {"LSTMCell": "lstm", "GRUCell": "gru"}.get(
                name
            ) or f"rnn_{getattr(cell.activation, '__name__', 'tanh')}"
            bias = site_forget_bias(s)
            if bias is not None:
                biases[s.name] = bias
        weights = {
            s.name: {rec: [layer.cell.recurrent_kernel.path] for rec, layer in s.directions if s.blocks}
            for s in self.sites
        }
        return {"recurrent_layers": kinds, "forget_bias": biases, "recurrence_weights": weights}

    # ------------------------------------------------------------ the layers' calls
    def install(self) -> Callable[[], None]:
        """Wrap every site's ``call``; returns the function that restores them."""
        undo = [self._wrap(site) for site in self.sites]

        def restore() -> None:
            for fn in undo:
                fn()

        return restore

    def _wrap(self, site: _Site) -> Callable[[], None]:
        layer = site.layer
        original = layer.call
        signature = inspect.signature(original)

        @functools.wraps(original)
        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            drawn: list[dict[str, Any]] = []
            undo: Callable[[], None] | None = None
            try:
                named = signature.bind(inputs, *args, **kwargs).arguments
                if _training(named) and not self.broken:
                    mask = named.get("mask")
                    mask = mask[0] if isinstance(mask, (list, tuple)) else mask
                    site.call = {
                        "x": _primal(inputs),
                        "mask": _primal(mask),
                        "states": _primal(named.get("initial_state")),
                    }
                    inputs = self._probe(site, inputs)
                    if site.diag is None and any(_kcells.has_dropout(layer.cell) for _, layer in site.directions):
                        drawn = [{} for _ in site.directions]
                        undo = _kcells.capture_dropout((layer.cell, d) for d, (_, layer) in zip(drawn, site.directions))
            except Exception as exc:  # noqa: BLE001 - measuring is optional, the call is not
                self._fail("propagation replay", exc)
            if undo is None:
                return original(inputs, *args, **kwargs)
            try:
                return original(inputs, *args, **kwargs)
            finally:
                undo()
                try:
                    site.call["dropout"] = [
                        _kcells.dropout_masks(layer.cell, True, _primal(d.get("input")), _primal(d.get("recurrent")))
                        for d, (_, layer) in zip(drawn, site.directions)
                    ]
                except Exception as exc:  # noqa: BLE001 - measuring is optional
                    self._fail("propagation replay", exc)

        object.__setattr__(layer, "call", call)

        def restore() -> None:
            if layer.__dict__.get("call") is call:
                object.__delattr__(layer, "call")
            site.call = {}

        return restore

    def _probe(self, site: _Site, x: Any) -> Any:
        """torch, on a profiled step: ``x`` as a tensor whose gradient hook adds the
        per-timestep sums of squares of dL/dx (over batch and features) to ``site.sq``, the
        sensitivity of :class:`gradwatch.profiles.TemporalProfile`. An input that needs no
        gradient (data) goes through an identity that also takes one of the layer's
        weights and gives it no gradient (:func:`_torch_tap`): autograd then computes dL/dx
        on this step only, in ``loss.backward()`` and in ``torch.autograd.grad(loss,
        weights)`` alike (a detached leaf is reached by the first only). JAX:
        :meth:`_tap`. Other steps and backends: ``x`` itself."""
        if not self.sensitivity or self.broken_sensitivity:
            return x
        if keras.backend.backend() == "jax":
            return x if self.lean else self._tap(site, x)
        step = self.next_step()
        if step is None or not profile_due(step, self._every):
            return x
        import torch

        if not (torch.is_tensor(x) and x.dim() == 3 and x.is_floating_point() and int(x.shape[1]) == site.length):
            return x
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return x  # (a compiled step: the host does not know its steps)
        if x.requires_grad:
            y = x.view_as(x)
        else:  # data: through an identity tied to a weight, so any backward reaches it
            anchors = [v.value for v in site.weights if getattr(v, "trainable", False)]
            y = _torch_tap().apply(x, anchors[0]) if anchors else x.detach().requires_grad_(True)

        def hook(g: Any) -> None:
            try:
                with torch.no_grad():
                    sq = g.float().square().sum(dim=(0, 2)).double()
                    site.sq = sq if site.sq is None else site.sq + sq
            except Exception as exc:  # noqa: BLE001 - never break the backward pass
                self.broken_sensitivity = True
                self._fail("temporal probe", exc)

        y.register_hook(hook)
        return y

    def _tap(self, site: _Site, x: Any) -> Any:
        """JAX: ``x`` through an identity (``jax.custom_vjp``) whose backward computes the
        per-timestep sums of squares of dL/dx and leaves them in ``site.sq``. A jitted
        step's backward is traced in the same trace as the optimizer step that follows
        it, so :meth:`parts` puts them into that step's row (the ring: no host callback,
        whose effect would take every step off JAX's fast dispatch path); an eager
        ``jax.grad`` leaves arrays there the same way. When ``x`` is data (no gradient
        of its own) the identity also takes one of the layer's trainable weights, whose
        cotangent it leaves a symbolic zero: the backward then computes dL/dx (a
        matmul per timestep the step did not need) and no gradient changes. Every step
        computes it (a jitted step cannot branch its backward on the step number); the
        row keeps it on profiled steps only."""
        import jax

        if not (hasattr(x, "shape") and len(x.shape) == 3 and x.shape[1] == site.length):
            return x
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return x
        anchors = [v for v in site.weights if getattr(v, "trainable", False)]
        if site.tap is None:
            site.tap = _jax_tap(site)
        anchor = anchors[0].value if anchors else jax.numpy.zeros((), "float32")
        if anchors and not _has_tangent(x):  # data: the backward computes dL/dx for the probe alone
            feat = int(x.shape[2])
            # dL/dx is one matmul of the gates' width by F per timestep and direction; the
            # layer's training, three of (F + units) (forward, and both gradients backward)
            self.anchored[site.name] = sum(
                feat / (3.0 * (feat + int(getattr(getattr(layer, "cell", layer), "units", feat))))
                for _, layer in site.directions
            )
        return site.tap(x, anchor)

    # ------------------------------------------------------------ the row
    def segments(self) -> list[Segment]:
        out = [Segment("spectral", 1, key=b.name, labels=(b.name,)) for s in self.sites for b in s.blocks]
        if self.sensitivity:
            out += [Segment("temporal", s.length, key=s.name) for s in self.sites]
        out += [Segment("gates", 2, key=s.name, labels=(s.gate_name,)) for s in self.sites if s.gate_name is not None]
        for kind in ("propagation", "max_gains"):
            out += [
                Segment(kind, len(s.directions) * s.length, key=s.name, labels=tuple(n for n, _ in s.directions))
                for s in self.sites
            ]
        return out

    def _period(self, site: _Site, x: Any) -> int:
        """Replay on every n-th profiled step (the option, else the plan's cost model from
        shapes: the layer's training matmuls against the replay's)."""
        if self._replay_every:
            return int(self._replay_every)
        batch, feat = int(x.shape[0]), int(x.shape[2])
        replay, train = _kreplay.costs([layer for _, layer in site.directions], feat, site.length, min(batch, PROBED))
        train *= batch
        return replay_every(2.0 * replay, 2.0 * train, self._every)

    def parts(self, step: Any, host_step: int | None, active: Any) -> dict[tuple[str, str], Any]:
        """Row entries of every site for this step; ``host_step`` is the step number when
        the host knows it (torch: nothing runs on a step that is not due). On JAX the
        kept values staged here are written at the end, one write per buffer
        (:meth:`Kept.commit`)."""
        kept = [site.kept for site in self.sites if site.kept is not None]
        for k in kept:
            k.clear()  # (anything a failed trace left)
        out = self._row_parts(step, host_step, active)
        if host_step is None:
            for k in kept:
                k.commit(step)
        return out

    def _row_parts(self, step: Any, host_step: int | None, active: Any) -> dict[tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = {}
        out.update(self._spectral_parts(step, host_step, active))
        if self.sensitivity:  # what the probe's hooks summed in this step's backward, else NaN
            for site in self.sites:
                sq, site.sq = site.sq, None
                nan = self._nans((site.length,), widest("float64"))
                if sq is None or self.broken_sensitivity or (self.lean and host_step is None):
                    out[("temporal", site.name)] = nan
                elif keras.backend.backend() != "jax":
                    out[("temporal", site.name)] = sq
                else:  # computed on every step (see _tap): kept on profiled ones
                    out[("temporal", site.name)] = self._jax_sensitivity(sq, nan, step, host_step, active)
        for site in self.sites:
            call, site.call = site.call, {}
            nan = self._nan(site)
            if site.diag is not None:
                logs = self._diagonal(site, call, step, host_step, active, nan[0])
                out[("propagation", site.name)] = logs[0]
                out[("max_gains", site.name)] = logs[1]
                continue
            measurable = bool(call) and not self.broken and int(call["x"].shape[1]) == site.length
            masks = "dropout" in call  # the call's own dropout masks (:meth:`_wrap`)
            measurable = measurable and all(
                _kcells.supported(layer.cell, True, masks=masks) for _, layer in site.directions
            )
            if not measurable:
                logs, gates = nan
            else:
                every = max(self._every, 1)
                period = self._period(site, call["x"])
                if host_step is not None:
                    k = profiled_ordinal(host_step, every)
                    due = bool(profile_due(host_step, self._every)) and k % period == 0
                    logs, gates = self._eager(site, call, step) if due else nan
                else:
                    k = profiled_ordinal(step, every)
                    due = ops.logical_and(profile_due(step, self._every, KERAS_OPS), active)
                    due = ops.logical_and(due, ops.equal(ops.mod(k, period), 0))
                    if not self.lean:  # (a lean function runs unprofiled steps only)
                        self._keep(site, call, step, due)
                    logs, gates = nan  # the host replays the kept buffers (:meth:`fill`)
            if site.gate_name is not None:
                out[("gates", site.name)] = gates
            out[("propagation", site.name)] = logs[0]
            out[("max_gains", site.name)] = logs[1]
        return out

    def _diagonal(self, site: _Site, call: dict[str, Any], step: Any, host_step: int | None, active: Any, nan: Any) -> Any:
        """A diagonal site's log gains [2, 1, T] on a profiled step, else NaN: computed in
        the step from the call's input and the weights before the update
        (:func:`gradwatch_tf._kdiag.site_logs`), eagerly when the host knows the step, under
        a ``cond`` in a jitted one (nothing on unprofiled steps; none in a lean trace)."""
        if not call or self.broken or int(call["x"].shape[1]) != site.length:
            return nan
        if host_step is not None:
            if not profile_due(host_step, self._every):
                return nan
            if keras.backend.backend() == "torch":
                import torch

                with torch.no_grad():  # (the weights require grad: no graph for this)
                    return _kdiag.site_logs(site.diag, site.layer, call["x"])
            return _kdiag.site_logs(site.diag, site.layer, call["x"])
        if self.lean:
            return nan
        due = ops.logical_and(profile_due(step, self._every, KERAS_OPS), active)
        x = call["x"]
        return ops.cond(due, lambda: _kdiag.site_logs(site.diag, site.layer, x), lambda: nan)

    def lean_saving(self) -> float:
        """JAX: the share of a training step a lean train function saves, from shapes: the
        probes' dL/dx of data inputs against their layers' own training matmuls (an upper
        bound: the rest of the model dilutes it). 0 when no probe computes one."""
        return min(sum(self.anchored.values()), 0.5)

    def _jax_sensitivity(self, sq: Any, nan: Any, step: Any, host_step: int | None, active: Any) -> Any:
        """This step's sums of squares (JAX) on a profiled step, else NaN. ``sq`` must
        come from this very trace (a backward traced for another function, say a user's
        own ``jax.grad``, is not this step's): otherwise NaN."""
        if _trace_of(sq) is not _trace_of(step):
            return nan
        f = widest("float64")
        if host_step is not None:
            return ops.cast(sq, f) if profile_due(host_step, self._every) else nan
        due = ops.logical_and(profile_due(step, self._every, KERAS_OPS), active)
        return ops.where(due, ops.cast(sq, f), nan)

    # ------------------------------------------------------------ spectral norms
    def _spectral_parts(self, step: Any, host_step: int | None, active: Any) -> dict[tuple[str, str], Any]:
        """sigma_max of every gate block, on profiled steps, of the kernel *before* the
        update (what this step's forward used, as on TensorFlow and PyTorch): computed on
        the host (:class:`gradwatch.through_time.spectral.HostSpectral`). On torch the host
        knows the step, so a profiled one reads the kernels now (one copy to the host on
        profiled steps only); on JAX the jitted step keeps them on profiled steps
        (:meth:`_keep_weights`) and :meth:`fill` computes from those. NaN where nothing
        is measured (the host leaves those out)."""
        blocks = [b for site in self.sites for b in site.blocks]
        if not blocks:
            return {}
        f = widest("float64")
        nan = self._nans((), f)
        out: dict[tuple[str, str], Any] = {("spectral", b.name): nan for b in blocks}
        if host_step is None:
            due = ops.logical_and(profile_due(step, self._every, KERAS_OPS), active)
            for site in self.sites if not self.lean else ():
                self._keep_weights(site, step, due)
            return out
        if self.spectral_broken or not profile_due(host_step, self._every):
            return out
        try:
            kernels = {id(b.kernel): b.kernel for b in blocks}  # each copied to the host once
            host = {k: ops.convert_to_numpy(v.value) for k, v in kernels.items()}
            sigmas = [self._sigma(b, host[id(b.kernel)]) for b in blocks]
        except Exception as exc:  # noqa: BLE001 - measuring is optional
            self.spectral_broken = True
            self._fail("spectral norms", exc)
            return out
        values = ops.convert_to_tensor(np.asarray(sigmas, np.float64), f)
        return {("spectral", b.name): values[k] for k, b in enumerate(blocks)}

    def _sigma(self, block: _Block, kernel: Any) -> float:
        return self._spectral(block.name, np.asarray(kernel)[:, block.start : block.stop])

    def _keep_weights(self, site: _Site, step: Any, due: Any) -> None:
        """In the jitted step: on a profiled step, the cells' weights before the update
        and that step's number into the site's buffers (``ops.where``: no branch)."""
        kept = site.kept
        if kept is None:
            return
        for key, v in zip(kept.weights, site.weights):
            kept.stage(key, v.value, due)
        kept.stage("wstep", ops.cast(step, "int32"), due)

    def _fill_spectral(
        self, layout: Any, row: np.ndarray, step: int, host_of: Callable[[Kept], KeptHost]
    ) -> np.ndarray:
        """JAX, on the host: sigma_max of the blocks whose kept weights are this step's."""
        if self.spectral_broken:
            return row
        for site in self.sites:
            kept = site.kept
            if kept is None or not site.blocks:
                continue
            try:
                host = host_of(kept)
                slot = host.wslot(step)
                if slot is None:
                    continue
                values = {}
                for b in site.blocks:
                    j = next(i for i, v in enumerate(site.weights) if v is b.kernel)
                    values[b.name] = self._sigma(b, host.at(kept.weights[j], slot))
            except Exception as exc:  # noqa: BLE001 - measuring is optional
                self.spectral_broken = True
                self._fail("spectral norms", exc)
                return row
            row = np.array(row, dtype=np.float64)
            for name, sigma in values.items():
                sl = layout.slice("spectral", name)
                if sl is not None:
                    row[sl] = sigma
        return row

    # ------------------------------------------------------------ JAX: kept, replayed on the host
    def buffers(self, make: Callable[[Any, str, str], Any], per_execution: int = 1) -> None:
        """On JAX, the device buffers a jitted step writes what the replay needs into (see
        :class:`Kept`); created outside any trace, carried in the step's state. One slot
        per profiled step an execution of ``per_execution`` steps (``steps_per_execution``)
        can hold: the host reads after the execution, and finds each of them. (Each slot
        holds a copy of the cells' weights: K copies in all, as on TensorFlow.)"""
        every = max(self._every, 1)
        per_slot = sum(_kkept.slot_bytes(s.length, s.directions) for s in self.sites if s.diag is None)
        slots = _kkept.slots_for(per_execution, every, per_slot)  # (the count TensorFlow's buffers use)
        for site in self.sites:
            if site.diag is None:  # (a diagonal site keeps nothing: measured in the step)
                site.kept = Kept.make(site.salt, site.length, site.directions, make, slots, every)

    def _keep(self, site: _Site, call: dict[str, Any], step: Any, due: Any) -> None:
        """In the jitted step: on a due step, the first sequences of the call and the
        cells' weights *before* the update into the site's buffers (``ops.where``: no
        branch, a few small copies); nothing of the replay is traced here."""
        kept = site.kept
        if kept is None:
            return
        x = ops.cast(call["x"], "float32")[:PROBED]
        b = int(x.shape[0])
        mask = call["mask"]
        mask = ops.ones(x.shape[:2], "float32") if mask is None else ops.cast(mask, "float32")[:PROBED]
        mask = ops.reshape(mask, x.shape[:2])
        states = call["states"]
        flat = [] if states is None else (list(states) if isinstance(states, (list, tuple)) else [states])
        if flat and len(flat) != len(kept.states):
            return  # a state layout the buffers do not hold: not measured (NaN)
        flat = [ops.cast(v, "float32")[:PROBED] for v in flat] or [
            ops.zeros((b, *kept.segs[key].shape[-1:]), "float32") for key in kept.states
        ]

        def pad(v: Any) -> Any:
            return ops.pad(v, [[0, PROBED - b]] + [[0, 0]] * (len(v.shape) - 1)) if b < PROBED else v

        pairs = [(kept.x, pad(x)), (kept.mask, pad(mask))]
        pairs += [(key, pad(v)) for key, v in zip(kept.states, flat)]
        if any(d is not None for pair in kept.drops for d in pair):  # the call's own dropout masks
            drops = call.get("dropout")
            if drops is None or len(drops) != len(kept.drops):
                return
            for buf, m in ((b, m) for bufs, ms in zip(kept.drops, drops) for b, m in zip(bufs, ms)):
                bs, ms = _as_list(buf), _as_list(m)
                if isinstance(buf, list) != isinstance(m, (list, tuple)) or len(bs) != len(ms):
                    return  # masks the buffers do not hold (one per gate, or none): not measured (NaN)
                pairs += [(bv, pad(ops.cast(mv, "float32")[:PROBED])) for bv, mv in zip(bs, ms)]
        # (the weights: kept on every profiled step by _keep_weights, a superset of these)
        pairs += [("n", ops.convert_to_tensor(b, "int32")), ("step", ops.cast(step, "int32"))]
        for key, value in pairs:
            kept.stage(key, value, due)

    def fill(self, layout: Any, row: np.ndarray, read: Callable[[Any], Any]) -> np.ndarray:
        """On the host, at the read of a profiled step's row (JAX): each site whose buffers
        hold this very step is replayed on them (compiled once per site, apart from the
        train step) and its log entries written into the row, so the record of that step
        carries them with its own step number. A site whose slots hold no copy of this
        step (a step not due for its replay, or one overwritten by a later one before the
        host read) stays NaN: not measured."""
        step_sl = layout.slice("step")
        if step_sl is None:
            return row
        step = int(row[step_sl][0])
        hosts: dict[int, KeptHost] = {}

        def host_of(kept: Kept) -> KeptHost:  # (one host copy of a site's buffers per row)
            if id(kept) not in hosts:
                hosts[id(kept)] = kept.host(read)
            return hosts[id(kept)]

        row = self._fill_spectral(layout, row, step, host_of)
        if self.broken:
            return row
        for site in self.sites:
            kept = site.kept
            if kept is None:
                continue
            try:
                host = host_of(kept)
                s = host.held(step)  # (inputs and weights both of this step, in one slot)
                if s is None:
                    continue
                n = host.number("n", s)

                def at(key: str, s: int = s, n: int | None = n, host: KeptHost = host) -> Any:
                    return host.at(key, s, n)

                call = {"x": at(kept.x), "mask": at(kept.mask), "states": [at(v) for v in kept.states]}
                if any(d is not None for pair in kept.drops for d in pair):

                    def rows(buf: Any) -> Any:
                        if buf is None:
                            return None
                        return [at(v) for v in buf] if isinstance(buf, list) else at(buf)

                    call["dropout"] = [(rows(a), rows(b)) for a, b in kept.drops]
                out = self._host_replay(site, call, np.int32(step), [at(v, n=None) for v in kept.weights])
                if out is None:
                    continue  # its compile is not ready yet: not measured (NaN)
                logs, gates = np.asarray(out[0], np.float64), np.asarray(out[1], np.float64)
            except Exception as exc:  # noqa: BLE001 - measuring is optional
                self.broken = True
                self._fail("propagation replay", exc)
                return row
            row = np.array(row, dtype=np.float64)
            for kind, value in (("propagation", logs[0]), ("max_gains", logs[1]), ("gates", gates)):
                sl = layout.slice(kind, site.name)
                if sl is not None:
                    row[sl] = value.reshape(-1)
        return row

    def _host_replay(self, site: _Site, call: dict[str, Any], step: Any, values: list[Any]) -> tuple[Any, Any] | None:
        """The host replay of kept buffers (JAX): compiled once per site and probed batch
        size (:func:`gradwatch_tf._kkept.run`), on numpy while that compile is not ready
        or in a fit too short to compile for (:mod:`gradwatch_tf._knumpy`)."""
        self._eager(site, call, step, values, lower=True)
        return _kkept.run(
            self._compiled,
            (site.name, int(call["x"].shape[0])),
            self._jitted[site.name][1],
            (values, call, step),
            steps_left=self.steps_left,
            fallback=functools.partial(self._numpy_replay, site, call, int(step), values) if site.numpy_ok else None,
            rent=self._rent,
        )

    def _numpy_replay(self, site: _Site, call: dict[str, Any], step: int, values: list[Any]) -> tuple[Any, Any]:
        """:func:`gradwatch_tf._knumpy.replay` of kept buffers read to the host."""
        flat = [np.asarray(v) for v in _as_list(call["states"])]
        per = len(flat) // len(site.directions)
        states = [flat[i * per : (i + 1) * per] or None for i in range(len(site.directions))]
        drops = call.get("dropout") or [None] * len(site.directions)
        logs, gate = _knumpy.replay(
            site.directions,
            np.asarray(call["x"]),
            np.asarray(call["mask"]),
            states,
            drops,  # (device arrays: read to the host as the replay cuts them)
            list(zip(site.weights, values)),
            step=step,
            salt=site.salt,
        )
        return logs, np.full(2, np.nan) if gate is None else gate

    def _eager(
        self, site: _Site, call: dict[str, Any], step: Any, values: list[Any] | None = None, *, lower: bool = False
    ) -> tuple[Any, Any]:
        """An eager step's replay; on JAX compiled once per site (eager JAX would compile
        every scan at every call), the cells' weights passed in through a StatelessScope
        (their current values, or ``values``: those the kept gradients belonged to)."""
        if keras.backend.backend() != "jax":
            return self._measure(site, call, step)
        if site.name not in self._jitted:
            import jax

            weights = site.weights

            def pure(values: list[Any], kept: dict[str, Any], at: Any) -> tuple[Any, Any]:
                with keras.StatelessScope(state_mapping=list(zip(weights, values))):
                    return self._measure(site, kept, at)

            self._jitted[site.name] = (weights, jax.jit(pure))
        weights, fn = self._jitted[site.name]
        if lower:  # only make sure the jitted function exists (see _host_replay)
            return None  # type: ignore[return-value]
        return fn([v.value for v in weights] if values is None else values, call, step)  # type: ignore[no-any-return]

    def _nan(self, site: _Site) -> tuple[Any, Any]:
        return self._nans((2, len(site.directions), site.length), "float32"), self._nans((2,), "float32")

    def _nans(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A NaN tensor of ``shape``: on torch (eager) made once and reused, since each
        ``keras.ops`` call costs tens of µs a step there; elsewhere made here (a JAX trace
        must not keep a traced constant for the next one)."""
        if keras.backend.backend() != "torch":
            return ops.full(shape, math.nan, dtype)
        key = (shape, dtype)
        if key not in self._nan_cache:
            self._nan_cache[key] = ops.full(shape, math.nan, dtype)
        return self._nan_cache[key]

    def _measure(self, site: _Site, call: dict[str, Any], step: Any) -> tuple[Any, Any]:
        logs, gates = [], []
        states = call["states"]
        per = None if states is None else (len(states) if isinstance(states, list) else 1) // len(site.directions)
        flat = states if isinstance(states, list) else [states]
        for i, (_, layer) in enumerate(site.directions):
            seed = ops.cast(step, "int32") * 4099 + (site.salt * 16 + i)
            own = None if per is None else flat[i * per : (i + 1) * per]
            drops = call.get("dropout")
            per_seq, gate = _kreplay.measure(
                layer.cell,
                call["x"],
                call["mask"],
                own,
                backwards=bool(layer.go_backwards),
                seed=seed,
                dropout=None if drops is None else drops[i],
            )
            logs.append(ops.stack(aggregate_logs(per_seq[0], per_seq[1], KERAS_TENSORS)))  # the engine's rule
            gates.append(gate)
        logs_t = ops.transpose(ops.stack(logs), (1, 0, 2))  # [2, R, T]
        if all(g is not None for g in gates):
            per_dir = ops.stack(gates)  # the direction whose memory path closes most
            gate = ops.take(per_dir, ops.argmin(per_dir[:, 1]), axis=0)
        else:
            gate = ops.full((2,), math.nan, "float32")
        return logs_t, gate

    def exp_logs(self, layout: Any, row: np.ndarray) -> np.ndarray:
        """The host's ``exp`` of the logged gains of a row (float64)."""
        row = np.array(row, dtype=np.float64)
        for s in self.sites:
            for kind in ("propagation", "max_gains"):
                sl = layout.slice(kind, s.name)
                if sl is not None:
                    row[sl] = np.exp(row[sl])
        return row
