"""Attach a gradwatch monitor to a PyTorch model and its optimizer.

gradwatch measures inside ``optimizer.step()`` (:mod:`gradwatch_torch._stephooks`);
without an optimizer, ``watch.step()`` is the measuring point.

One step costs: the parameter norms in a few fused operations per (device, dtype) group
(:class:`gradwatch_torch._tensors.GradGroups`), a policy's decision on the device
(:mod:`gradwatch_torch._devicepolicy`), and, on a *read* step, one concatenation of
everything measured (and on profiled steps what the recurrent probes gathered) in the
core's statistics layout and one device-to-host copy of it. A *quiet* step (neither
profiled nor flushed, ``on_nonfinite="warn"``) reads nothing: its row stays on the device
(:mod:`gradwatch_torch._ring`) and is recorded at the next read with its own step number.
What the recurrent probes gather comes from :mod:`gradwatch_torch._probeset`. The core
(``monitor.process``) turns the numbers into the record, the events and the decision;
this module acts on it (multiply the gradients, or drop them so the optimizer step is a
no-op).

``torch.amp.GradScaler``: ``scaler.step(optimizer)`` unscales before calling
``optimizer.step()``, so gradwatch sees and clips unscaled gradients. A step the scaler
skips (it found Inf/NaN in the scaled gradients) never calls ``optimizer.step()``; gradwatch
does not see it, does not count it, and the scaler's own backoff handles it.

``optimizer.step(closure)``: the step's gradient exists only once the closure has run
inside ``step()``; gradwatch measures after the closure's first evaluation
(:mod:`gradwatch_torch._closure`). The parameter set is followed as it changes
(:mod:`gradwatch_torch._paramset`): parameters added later are measured, clipped and
checked; frozen ones and those without a gradient this step are absent from the record.

Failures: a failure of the core measurement (the gradient norms, the step's one copy, the
monitor, applying the decision) stops gradwatch on this model, training untouched; an
optional measurement that fails (a recurrent layer's profile, gate statistics, spectral
norms, propagation gains; unit-wise clipping) turns off alone, with a message naming it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradwatch import HandleGroup, Segment, infer_layer, profile_due
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch_torch import _distributed
from gradwatch_torch._closure import ClosureSteps, refuse_policy
from gradwatch_torch._devicepolicy import TorchDevicePolicy, global_norm
from gradwatch_torch._paramset import ParamSet, describe_change, drop_grads, sparse_grad_positions, unwrap_model
from gradwatch_torch._probeset import ProbeSet
from gradwatch_torch._recurrent import Probe, ProbeContext, dense_parameter_count
from gradwatch_torch._ring import MAX_PENDING, DeviceRing
from gradwatch_torch._segments import cat_to
from gradwatch_torch._stephooks import NO_STEP_WARNING_AFTER, BackwardCounter, OptimizerHooks
from gradwatch_torch._tensors import GradGroups, agc_factors, apply_agc_, scale_grads_

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch import MonitorPort, StepRecord

__all__ = ["MAX_PENDING", "NO_STEP_WARNING_AFTER", "TorchAttachment", "attach", "unwrap_model"]

logger = logging.getLogger("gradwatch")

#: Models currently watched (the unwrapped module). Weak: a Watch never keeps a model alive.
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _layer_types(root: nn.Module, layers: Any) -> dict[str, str]:
    """Layer name -> module class name, for the report's labels ("0 (Linear)")."""
    out: dict[str, str] = {}
    for layer in layers:
        try:
            out[layer] = type(root.get_submodule(layer)).__name__
        except (AttributeError, ValueError):  # a parameter of the root itself, or an unusual name
            continue
    return out


class TorchAttachment:
    """The PyTorch side of a Watch: hooks, on-device measurement, clipping, skipping.

    Holds the parameters (tensors) but only a weak reference to the model, so dropping
    the model frees it even if the Watch lives on.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, monitor: MonitorPort) -> None:
        root = unwrap_model(model)
        if root in _WATCHED:
            raise GradwatchError(
                f"This {type(root).__name__} is already watched by gradwatch. Close the first watch (watch.close(), or "
                "use `with gradwatch.watch(...)`) before watching it again."
            )
        refuse_policy(optimizer, monitor.policy, monitor.options.policy)
        self._policy = monitor.policy
        self._unitwise = bool(getattr(self._policy, "unitwise", False))
        self._monitor = monitor
        self._model = weakref.ref(root)
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._handles = HandleGroup()
        self._closed = False
        self._broken = False
        self._collecting = True  # may the probes collect now? (not in LBFGS's later evaluations)
        self._world = 1
        #: Quiet steps measured but not yet read, on the device (issue 20).
        self._ring = DeviceRing(monitor, self._break)
        set_reader = getattr(monitor, "set_pending_reader", None)
        if callable(set_reader):  # watch.monitor.step_count / .records read the device first
            set_reader(self._flush_pending)
        self.names: list[str] = []
        #: DDP: every rank holds the same gradient, so every rank must take the same decision.
        self._replicated = type(model).__name__ == "DistributedDataParallel"
        self._params = ParamSet(root, optimizer)
        self._handles.add(self._params)
        try:
            named, _ = self._params.collect()
            if not named:
                raise GradwatchError(f"{type(root).__name__} has no parameters; there is no gradient for gradwatch to watch.")
            self._bind(named, wrapper=model)
        except BaseException:
            self._handles.remove()
            raise

        #: The policy runs on the device (state in tensors), on every step: a quiet step
        #: clips without a host read, and read steps decide the same way.
        self._runner: TorchDevicePolicy | None = None
        if TorchDevicePolicy.supports(self._policy):
            try:
                self._runner = TorchDevicePolicy(self._policy, self._groups.device)
            except Exception as exc:  # noqa: BLE001 - a custom policy the torch ops cannot run: the host decides
                logger.info("gradwatch: policy %r decides on the host at every step (%s: %s).", self._policy, type(exc).__name__, exc)
            else:
                monitor.decide_on_device(self._runner)
                self._ring.policy_name = self._policy.name
        #: May a step leave its statistics on the device? Not with on_nonfinite "skip" or
        #: "raise" (the step's fate needs the host before the optimizer runs), nor for
        #: unit-wise clipping or a policy that decides on the host.
        self._may_defer = monitor.options.on_nonfinite == "warn" and not self._unitwise and (self._policy is None or self._runner is not None)

        meta = monitor.meta  # facts for the run file's header
        meta.setdefault("backend", "torch")
        meta.setdefault("torch", torch.__version__)
        meta.setdefault("recurrent_layers", {})
        meta.setdefault("forget_bias", {})
        ctx = None
        if monitor.options.profile_every:
            opts = monitor.options
            ctx = ProbeContext(self._probe_due, self._next_step, opts.profile_every, dense_parameter_count(root), opts.replay_every)
        self._probeset = ProbeSet(ctx, meta, self._next_step)
        self._probes: list[Probe] = self._probeset.probes  # the same list, for tests and tools
        self._probeset.describe(self._probeset.add(root, self._handles))
        live = getattr(monitor, "live", None)
        if isinstance(live, dict):  # the remedies quote the forget-gate bias as it is when they are written
            live["forget_bias"] = self._probeset.forget_bias_now
        if optimizer is not None:
            self._closures = ClosureSteps(optimizer, self._measure, self._set_collecting, clips=self._policy is not None)
            OptimizerHooks(optimizer, self._closures, self._measure_quiet, self._handles)
        self._backwards = BackwardCounter(root, optimizer is not None, self._no_step_yet, self._warn)
        _WATCHED.add(root)
        meta.setdefault("layer_types", _layer_types(root, self._monitor.layers))
        self._check_distributed()

    @property
    def _pending(self) -> list[Any]:
        """The quiet steps' rows still on the device (oldest first)."""
        return self._ring.rows

    # -- Attachment protocol --------------------------------------------------------------
    def step(self) -> StepRecord | None:
        """Measure now (a watch without optimizer: after backward, before optimizer.step())."""
        if self._closed:
            raise GradwatchError("This watch is closed; watch.step() has nothing to measure.")
        if self._optimizer is not None:
            raise GradwatchError(
                "This watch runs inside optimizer.step() already (it was given the optimizer); calling watch.step() "
                "too would measure the step twice."
            )
        return self._measure()

    def sync(self) -> None:
        """Bring the quiet steps' statistics to the host and record them, in step order."""
        self._flush_pending()

    def close(self) -> None:
        """Remove every hook this attachment installed; idempotent."""
        if self._closed:
            return
        self._flush_pending()
        self._closed = True
        live = getattr(self._monitor, "live", None)
        if isinstance(live, dict) and live.get("forget_bias") == self._probeset.forget_bias_now:
            del live["forget_bias"]  # nothing of the model is read after close
        set_reader = getattr(self._monitor, "set_pending_reader", None)
        if callable(set_reader):
            set_reader(None)
        if self._runner is not None:
            try:  # the state goes back to the monitor (its state_dict after close)
                self._monitor.decide_on_device(None)
            except Exception:  # noqa: BLE001, S110 - close() never raises
                pass
        if self._backwards.count and self._monitor.next_step == 1 and not self._pending and not self._broken:
            self._warn(self._backwards.message("closed after"))
        self._backwards.stop()
        try:
            self._handles.remove()
        except Exception:  # noqa: BLE001, S110 - a hook whose owner is gone: nothing to remove
            pass
        self._probeset.close()
        root = self._model()
        if root is not None:
            _WATCHED.discard(root)

    def state_dict(self) -> dict[str, Any]:
        """The power-iteration vectors, so a resumed run reports the same spectral norms."""
        return self._probeset.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._probeset.load_state_dict(state)

    # -- the parameter set ----------------------------------------------------------------
    def _bind(self, named: list[tuple[str, Tensor]], wrapper: nn.Module | None = None) -> None:
        """Measure exactly ``named`` from the next step on (at attach, and when it changes).

        The monitor is rebound too: records already made keep their own names, the
        detectors key their statistics by name, so nothing before the change is disturbed.
        """
        root = self._model()
        if root is None or not named:
            return
        self._flush_pending()  # rows measured over the old set are recorded with its names
        shard = _distributed.shard_group(wrapper if wrapper is not None else root, root, named, self._unitwise)
        groups = GradGroups([p for _, p in named], local_shards=shard is not None, sparse=sparse_grad_positions(root, named))
        names = [n for n, _ in named]
        self._monitor.bind(names, [infer_layer(n) for n in names])
        before, self.names = self.names, names
        self._groups, self._shard_group = groups, shard
        self._ring.forget_layouts()
        if before:
            logger.info(
                "gradwatch: the watched parameters changed before step %d: %s; %d followed now.",
                self._next_step(),
                describe_change(before, names),
                len(names),
            )

    def _follow_params(self) -> None:
        """The hot path's check (a flag and a few integers); the model is walked only when
        something may have changed."""
        if self._params.stale():
            named, changed = self._params.collect()
            if changed:
                self._bind(named)
                root = self._model()
                new = self._probeset.add(root, self._handles) if root is not None else []
                if new:
                    self._probeset.describe(new)
                    logger.info("gradwatch: recurrent layer(s) %s joined the model; they are profiled from now on.", ", ".join(repr(p.name) for p in new))

    # -- the step ---------------------------------------------------------------------------
    def _measure_quiet(self) -> None:
        """The optimizer's pre-hook: a quiet step may leave its statistics on the device."""
        self._measure(read=False)

    def _warn(self, message: str) -> None:
        logger.warning("gradwatch: %s", message)

    def _no_step_yet(self) -> bool:
        return self._monitor.next_step == 1 and not self._pending

    def _set_collecting(self, flag: bool) -> None:
        self._collecting = flag

    def _probe_due(self) -> bool:
        """What the probes ask before collecting: a profiled step, and not a later closure
        evaluation of the step (LBFGS: one profile per step, never a concatenation)."""
        return self._collecting and bool(profile_due(self._next_step(), self._monitor.options.profile_every))

    def _next_step(self) -> int:
        """The number of the step being measured next (the monitor lags by the pending rows)."""
        return self._monitor.next_step + len(self._ring)  # next_step never reads the device

    def _quiet(self) -> bool:
        """Is the step about to be measured quiet: neither profiled nor flushed (and
        deferring is possible at all)? Such a step reads nothing back to the host."""
        if not self._may_defer or self._ring.full:
            return False
        step = self._next_step()
        opts = self._monitor.options
        return not profile_due(step, opts.profile_every) and step % opts.log_every != 0

    def _check_distributed(self) -> None:
        """Tell the monitor our rank once torch.distributed is up (only rank 0 writes)."""
        if self._world > 1:
            return
        got = _distributed.rank_and_world()
        if got is not None:
            self._world = got[1]
            self._monitor.set_distributed(*got)

    def _measure(self, read: bool = True) -> StepRecord | None:
        """Measure, hand the numbers to the monitor, act on its decision.

        With ``read=False`` (the optimizer's pre-hook) a quiet step (:meth:`_quiet`) keeps
        its statistics on the device and returns None: the policy decides and clips there,
        and the row is recorded at the next read (:meth:`_flush_pending`). Otherwise the
        rows still pending are recorded first, then this step, from one copy
        (:meth:`DeviceRing.read`).

        Only ``NonFiniteGradientError`` (``on_nonfinite="raise"``) may leave this method.
        A failure of the core (norms, the copy, the monitor, acting) stops gradwatch on
        this model; an optional measurement that fails turns off alone.
        """
        if self._closed or self._broken:
            return None
        if self._backwards.active:
            self._backwards.stop()
        quiet = not read and self._quiet()
        try:
            self._check_distributed()
            self._follow_params()
            grads = self._groups.grads()
            norms, present = self._groups.measure(grads)
            if self._shard_group is not None:  # FSDP2: sum the shards' squared norms
                sq = norms.to(torch.float64).square()
                torch.distributed.all_reduce(sq, group=self._shard_group)
                norms = sq.sqrt()
            elif self._world > 1 and self._replicated:  # DDP: every rank decides on the same numbers
                norms = _distributed.agree_norms(norms)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("measuring the gradient norms", exc)
            return None
        if quiet:
            self._defer(grads, norms, present)
            return None
        segments = [Segment("norms", len(self._groups))]
        parts: dict[tuple[str, str], Tensor] = {("norms", ""): norms}
        if self._runner is not None:
            try:
                parts[("clip", "")] = torch.stack(self._runner.run(global_norm(norms)))
                segments.append(Segment("clip", 2))
            except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
                self._break("deciding the clip", exc)
                return None
        profiled = bool(self._probes) and bool(profile_due(self._next_step(), self._monitor.options.profile_every))
        self._world = self._probeset.gather(segments, parts, profiled, self._world, self._groups.device)
        factors = self._agc_factors(grads, segments, parts) if self._unitwise else None
        try:
            layout = self._ring.layout(segments)
            row = layout.pack(parts, cat_to(self._groups.device, self._groups.stat_dtype))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("copying the step's statistics to the host", exc)
            return None
        stats = self._ring.read(layout, row, present)  # the pending rows are recorded first: one copy
        if stats is None:
            return None

        try:
            record = self._monitor.process(stats)
        except NonFiniteGradientError:
            raise  # on_nonfinite="raise": nothing has been changed yet
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("recording the step", exc)
            return None

        try:
            if record.skipped:
                drop_grads(self._groups.params, self._optimizer() if self._optimizer is not None else None)
            elif record.clip is not None and (factors is not None or record.clip.scale != 1.0):
                if factors is not None:
                    apply_agc_([g for gl in grads for g in gl], factors)
                else:
                    scale_grads_(self._groups.present_grads(grads), float(record.clip.scale))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("applying the clip or skip", exc)
        return record

    def _defer(self, grads: list[list[Tensor | None]], norms: Tensor, present: Any) -> None:
        """A quiet step: decide and clip on the device, keep the row for the next read.

        The scale multiplies the gradients whatever its value (x * 1.0 == x bitwise):
        branching on it would read it to the host.
        """
        try:
            clip = None
            if self._runner is not None:
                clip = self._runner.run(global_norm(norms))
                self._groups.scale_(grads, clip[1])
            self._ring.keep(norms, clip, present)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("measuring a quiet step", exc)

    def _flush_pending(self) -> None:
        """Record the quiet steps still on the device, oldest first, from one copy. Each
        keeps its own step number; the events they raise go out now (issue 20)."""
        if self._broken:
            self._ring.drop()
        else:
            self._ring.flush()

    def _agc_factors(self, grads: list[list[Tensor | None]], segments: list[Segment], parts: dict[tuple[str, str], Tensor]) -> list[Tensor | None] | None:
        """AGC's unit-wise factors and the clipped squared norms (an optional part: if it
        fails, the records go on, with no clip)."""
        flat = [g for gl in grads for g in gl]
        params = [p for grp in self._groups.groups for p in grp.params]
        goes_on = "Gradients are no longer clipped; the gradient norms and checks go on"
        what = "unit-wise clipping (policy 'agc')"
        got = self._probeset.optional(("", "agc"), what, agc_factors, params, flat, self._policy, goes_on=goes_on)
        if got is None:
            return None
        factors, clipped_sq = got
        segments.append(Segment("clipped_sq", int(clipped_sq.numel())))
        parts[("clipped_sq", "")] = clipped_sq
        return factors

    def _break(self, what: str, exc: BaseException) -> None:
        """The core failed: stop measuring this model (training goes on untouched). The
        quiet steps still on the device are recorded first (a read step brings them in
        with its own row, so its failure must not lose them)."""
        if self._ring.rows and not self._broken:
            self._ring.flush()  # a failure of this copy reports itself and stops us
        if not self._broken:
            self._broken = True
            self._probeset.stop()  # the step counter stops: stop probing too
            known = isinstance(exc, GradwatchError)
            logger.error(
                "gradwatch: %s failed at step %d (%s: %s); gradwatch stops watching this model: no more records, "
                "clipping or non-finite checks. Training goes on unchanged.%s",
                what,
                self._next_step(),
                type(exc).__name__,
                exc,
                "" if known else " Please report this as a bug.",
                exc_info=None if known else exc,
            )


def attach(model: nn.Module, optimizer: object | None, monitor: MonitorPort) -> TorchAttachment:
    """Attach ``monitor`` to ``model`` (and ``optimizer``); see :class:`TorchAttachment`."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradwatchError(
            f"optimizer must be a torch.optim.Optimizer or None; received {type(optimizer).__name__}. Without an "
            "optimizer, call watch.step() after backward() and before optimizer.step()."
        )
    return TorchAttachment(model, optimizer, monitor)
