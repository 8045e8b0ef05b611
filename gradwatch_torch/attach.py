"""Attach a gradwatch monitor to a PyTorch model and its optimizer.

gradwatch measures inside ``optimizer.step()`` through a step pre-hook, so the user's loop
does not change and only real optimizer steps are measured (micro-batches of gradient
accumulation are not). Without an optimizer, ``watch.step()`` is the measuring point.

One step costs: the parameter norms in a few fused operations per (device, dtype) group
(:class:`gradwatch_torch._tensors.GradGroups`), a policy's decision on the device
(:mod:`gradwatch_torch._devicepolicy`), and, on a *read* step, one concatenation of
everything measured (and on profiled steps what the recurrent probes gathered) in the
core's statistics layout and one device-to-host copy of it. A *quiet* step (neither
profiled nor flushed, ``on_nonfinite="warn"``) reads nothing: its row stays on the device
and is recorded at the next read with its own step number (issue 20). The core
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

import dataclasses
import logging
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from gradwatch import HandleGroup, Layout, Segment, infer_layer, profile_due
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch_torch import _distributed
from gradwatch_torch._closure import ClosureSteps, refuse_policy
from gradwatch_torch._devicepolicy import TorchDevicePolicy
from gradwatch_torch._paramset import ParamSet, describe_change, sparse_grad_positions, unwrap_model
from gradwatch_torch._sweeps import combine_ranks
from gradwatch_torch._recurrent import Probe, ProbeContext, SequenceProbe, dense_parameter_count, find_probes, forget_bias, install
from gradwatch_torch._segments import cat_to, gates_of, propagation_of, spectral_of, temporal_of
from gradwatch_torch._tensors import GradGroups, SpectralTracker, agc_factors, apply_agc_, scale_grads_

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch import MonitorPort, StepRecord

__all__ = ["TorchAttachment", "attach", "unwrap_model"]

logger = logging.getLogger("gradwatch")
_T = TypeVar("_T")

#: Backward passes without a measured step after which a watch says it records nothing.
NO_STEP_WARNING_AFTER = 16
#: Quiet steps kept on the device at most; one more is a read step (profile_every=0 with
#: a large log_every would otherwise keep them all).
MAX_PENDING = 256

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
        self._off: set[tuple[str, str]] = set()  # optional measurements turned off after a failure
        self._collecting = True  # may the probes collect now? (not in LBFGS's later evaluations)
        self._world = 1
        self._pending_state: dict[str, Any] = {}
        self._layouts: dict[tuple[Segment, ...], Layout] = {}
        self._outer_step: Any = None  # the frame of the optimizer.step() call being measured
        self._backwards = 0  # backward passes seen before the first measured step
        self._backward_hook: Any = None
        #: Quiet steps measured but not yet read: (layout, row on the device, presence mask).
        self._pending: list[tuple[Layout, Tensor, Any]] = []
        set_reader = getattr(monitor, "set_pending_reader", None)
        if callable(set_reader):  # watch.monitor.step_count / .records read the device first
            set_reader(self._flush_pending)
        self._quiet_layouts: dict[int, Layout] = {}
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
        #: May a step leave its statistics on the device? Not with on_nonfinite "skip" or
        #: "raise" (the step's fate needs the host before the optimizer runs), nor for
        #: unit-wise clipping or a policy that decides on the host.
        self._may_defer = monitor.options.on_nonfinite == "warn" and not self._unitwise and (self._policy is None or self._runner is not None)

        self._probes: list[Probe] = []
        self._probe_ctx: ProbeContext | None = None
        if monitor.options.profile_every:
            self._probe_ctx = ProbeContext(
                self._probe_due, self._next_step, monitor.options.profile_every, dense_parameter_count(root), monitor.options.replay_every
            )
        self._add_probes(root)
        if optimizer is not None:
            self._closures = ClosureSteps(optimizer, self._measure, self._set_collecting, clips=self._policy is not None)
            self._handles.add(optimizer.register_step_pre_hook(self._optimizer_hook))
            self._handles.add(optimizer.register_step_post_hook(self._after_step))
        self._count_backwards(root)
        _WATCHED.add(root)
        meta = monitor.meta  # facts for the run file's header
        meta.setdefault("backend", "torch")
        meta.setdefault("torch", torch.__version__)
        meta.setdefault("recurrent_layers", {})
        meta.setdefault("forget_bias", {})
        self._describe_probes(self._probes)
        meta.setdefault("layer_types", _layer_types(root, self._monitor.layers))
        self._check_distributed()

    def _add_probes(self, root: nn.Module) -> list[Probe]:
        """Probe every recurrent layer of ``root`` not probed yet (at attach, and when the
        parameter set changes: a layer added after ``watch()`` is profiled too)."""
        if self._probe_ctx is None:
            return []
        have = {id(p._module()) for p in self._probes}
        new = [p for p in find_probes(root, self._probe_ctx) if id(p._module()) not in have]
        for probe in new:
            module = probe._module()
            if module is None:  # cannot happen while root is alive; keeps the type checker honest
                continue
            for handle in install(probe, module):  # hooks that copies of the model leave out (_probing.CleanCopies)
                self._handles.add(handle)
        self._probes.extend(new)
        return new

    def _describe_probes(self, probes: list[Probe]) -> None:
        """What the remedies need to know of each probed layer (the run file's header too)."""
        meta = self._monitor.meta
        for p in probes:
            if getattr(p, "speculative", False):  # a user module not yet seen driven in a loop
                continue
            meta["recurrent_layers"][p.name] = p.kind
            module = p._module()
            bias = forget_bias(module) if module is not None else None
            if bias is not None:
                meta["forget_bias"][p.name] = bias

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
        set_reader = getattr(self._monitor, "set_pending_reader", None)
        if callable(set_reader):
            set_reader(None)
        if self._runner is not None:
            try:  # the state goes back to the monitor (its state_dict after close)
                self._monitor.decide_on_device(None)
            except Exception:  # noqa: BLE001, S110 - close() never raises
                pass
        if self._backwards and self._monitor.next_step == 1 and not self._pending and not self._broken:
            logger.warning("gradwatch: %s", self._no_steps_message(self._backwards, "closed after"))
        self._stop_counting_backwards()
        try:
            self._handles.remove()
        except Exception:  # noqa: BLE001, S110 - a hook whose owner is gone: nothing to remove
            pass
        for probe in self._probes:
            try:  # drop what it holds; close() never raises
                probe.close()
            except Exception:  # noqa: BLE001, S110 - a probe that failed already said so
                pass
        root = self._model()
        if root is not None:
            _WATCHED.discard(root)

    def state_dict(self) -> dict[str, Any]:
        """The power-iteration vectors, so a resumed run reports the same spectral norms."""
        spectral: dict[str, Any] = {}
        for probe in self._probes:
            if isinstance(probe, SequenceProbe):
                for wname, tracker in probe.trackers.items():
                    sd = tracker.state_dict()
                    if sd:
                        spectral[f"{probe.name}.{wname}"] = sd
        for key, sd in self._pending_state.items():
            spectral.setdefault(key, sd)
        return {"spectral": spectral}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        spectral = dict(state.get("spectral", {}) or {})
        for probe in self._probes:
            module = probe._module()
            if not isinstance(probe, SequenceProbe) or module is None:
                continue
            for wname in probe.recurrent_weights:
                key = f"{probe.name}.{wname}"
                if key in spectral:
                    tracker = SpectralTracker(len(probe.gates))
                    tracker.load_state_dict(spectral.pop(key), getattr(module, wname).device)
                    probe.trackers[wname] = tracker
        self._pending_state = spectral  # keys for layers not present: kept, not lost

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
        self._layouts.clear()
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
                new = self._add_probes(root) if root is not None else []
                if new:
                    self._describe_probes(new)
                    logger.info("gradwatch: recurrent layer(s) %s joined the model; they are profiled from now on.", ", ".join(repr(p.name) for p in new))

    # -- the step ---------------------------------------------------------------------------
    def _optimizer_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """Step pre-hook: measure now, or, when step() got a closure, after its first evaluation.

        torch wraps ``step`` per class: a subclass whose ``step()`` calls ``super().step()``
        runs the step hooks twice when the parent's ``step`` was wrapped too (an instance
        of the parent was created earlier). Only the outermost call of a real step is
        measured: the frame of the torch wrapper that called us is kept until that call's
        post-hook, and a pre-hook called while that frame is still on the stack is the
        nested ``super().step()``. (A step that raised leaves a stale frame; it is not on
        the stack of the next step, so that step is measured.)
        """
        caller = sys._getframe(1)  # torch's step wrapper
        outer = self._outer_step
        if outer is not None and _on_stack(outer, caller.f_back):
            return None
        self._outer_step = caller
        replaced = self._closures.begin(optimizer, args, kwargs)
        if replaced is None:
            self._measure(read=False)  # a quiet step may leave its statistics on the device
        return replaced

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._outer_step is not sys._getframe(1):
            return  # the nested super().step() of a subclass: the outer call ends the step
        self._outer_step = None
        self._closures.end(optimizer)

    # -- backward passes with no measured step -------------------------------------------------
    def _count_backwards(self, root: nn.Module) -> None:
        """Count backward passes until the first measured step: one hook on one parameter's
        gradient accumulation (removed at the first step), so a watch whose steps never come
        (no optimizer given, no ``watch.step()`` call) says so instead of recording nothing."""
        param = next((p for p in root.parameters() if p.requires_grad), None)
        hook = getattr(param, "register_post_accumulate_grad_hook", None)
        if hook is None:
            return
        self._backward_hook = hook(self._on_backward)

    def _on_backward(self, param: Tensor) -> None:
        self._backwards += 1
        if self._backwards == NO_STEP_WARNING_AFTER and self._monitor.next_step == 1 and not self._pending:
            logger.warning("gradwatch: %s", self._no_steps_message(self._backwards, "after"))
            self._stop_counting_backwards()

    def _stop_counting_backwards(self) -> None:
        handle, self._backward_hook = self._backward_hook, None
        if handle is not None:
            handle.remove()

    def _no_steps_message(self, backwards: int, when: str) -> str:
        if self._optimizer is None:
            how = "pass the optimizer (gradwatch.watch(model, optimizer)) or call watch.step() after backward()"
        else:
            how = "the watched optimizer's step() was never called; pass the optimizer that trains this model"
        return f"gradwatch recorded 0 steps {when} {backwards} backward passes: {how}."

    def _set_collecting(self, flag: bool) -> None:
        self._collecting = flag

    def _probe_due(self) -> bool:
        """What the probes ask before collecting: a profiled step, and not a later closure
        evaluation of the step (LBFGS: one profile per step, never a concatenation)."""
        return self._collecting and bool(profile_due(self._next_step(), self._monitor.options.profile_every))

    def _next_step(self) -> int:
        """The number of the step being measured next (the monitor lags by the pending rows)."""
        return self._monitor.next_step + len(self._pending)  # next_step never reads the device

    def _quiet(self) -> bool:
        """Is the step about to be measured quiet: neither profiled nor flushed (and
        deferring is possible at all)? Such a step reads nothing back to the host."""
        if not self._may_defer or len(self._pending) >= MAX_PENDING:
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
        rows still pending are recorded first, then this step, from one copy.

        Only ``NonFiniteGradientError`` (``on_nonfinite="raise"``) may leave this method.
        A failure of the core (norms, the copy, the monitor, acting) stops gradwatch on
        this model; an optional measurement that fails turns off alone.
        """
        if self._closed or self._broken:
            return None
        if self._backward_hook is not None:
            self._stop_counting_backwards()
        quiet = not read and self._quiet()
        if not quiet:
            self._flush_pending()
            if self._broken:
                return None
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
                parts[("clip", "")] = torch.stack(self._runner.run(self._global_norm(norms)))
                segments.append(Segment("clip", 2))
            except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
                self._break("deciding the clip", exc)
                return None
        self._gather(segments, parts)
        factors = self._agc_factors(grads, segments, parts) if self._unitwise else None
        try:
            key = tuple(segments)
            layout = self._layouts.get(key)
            if layout is None:
                layout = self._layouts[key] = Layout(segments)
            # The single device-to-host copy of the step.
            host = layout.pack(parts, cat_to(self._groups.device, self._groups.stat_dtype)).cpu().numpy()
            stats = layout.unpack(host, self._policy.name if self._runner is not None else None)
            if present is not None:
                stats = dataclasses.replace(stats, present=present)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("copying the step's statistics to the host", exc)
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
                self._drop_grads()
            elif record.clip is not None and (factors is not None or record.clip.scale != 1.0):
                if factors is not None:
                    apply_agc_([g for gl in grads for g in gl], factors)
                else:
                    scale_grads_(self._groups.present_grads(grads), float(record.clip.scale))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("applying the clip or skip", exc)
        return record

    @staticmethod
    def _global_norm(norms: Tensor) -> Tensor:
        """The global norm on the device, as the monitor computes it on the host (float64
        sum of the squared norms; absent parameters are 0 in ``norms``)."""
        return norms.to(torch.float64).square().sum().sqrt()

    def _defer(self, grads: list[list[Tensor | None]], norms: Tensor, present: Any) -> None:
        """A quiet step: decide and clip on the device, keep the row for the next read.

        The scale multiplies the gradients whatever its value (x * 1.0 == x bitwise):
        branching on it would read it to the host.
        """
        try:
            parts = [norms.to(torch.float64)]
            if self._runner is not None:
                thr, scale = self._runner.run(self._global_norm(norms))
                parts += [thr.reshape(1), scale.reshape(1)]
                by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
                for g in self._groups.present_grads(grads):
                    by_key.setdefault((g.device, g.dtype), []).append(g)
                for (device, dtype), gl in by_key.items():
                    torch._foreach_mul_(gl, scale.to(device=device, dtype=dtype))
            n = len(self._groups)
            layout = self._quiet_layouts.get(n)
            if layout is None:
                segments = [Segment("norms", n)] + ([Segment("clip", 2)] if self._runner is not None else [])
                layout = self._quiet_layouts[n] = Layout(segments)
            self._pending.append((layout, torch.cat(parts), present))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("measuring a quiet step", exc)

    def _flush_pending(self) -> None:
        """Record the quiet steps still on the device, oldest first, from one copy. Each
        keeps its own step number; the events they raise go out now (issue 20)."""
        pending, self._pending = self._pending, []
        if not pending or self._broken:
            return
        try:
            rows = torch.stack([row for _, row, _ in pending]).cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break("copying the quiet steps' statistics to the host", exc)
            return
        name = self._policy.name if self._runner is not None else None
        for (layout, _, present), row in zip(pending, rows):
            try:
                stats = layout.unpack(row, name)
                if present is not None:
                    stats = dataclasses.replace(stats, present=present)
                self._monitor.process(stats)
            except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
                self._break("recording a quiet step", exc)
                return

    def _optional(self, key: tuple[str, str], what: str, fn: Callable[..., _T], *args: Any, goes_on: str = "") -> _T | None:
        """Run one optional measurement; if it fails, turn off it alone and say which."""
        if key in self._off:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._off.add(key)
            logger.error(
                "gradwatch: %s failed at step %d (%s: %s); this measurement is off for the rest of this run. "
                "%s; training is not affected.",
                what,
                self._next_step(),
                type(exc).__name__,
                exc,
                goes_on or "The gradient norms, clipping, checks and the other measurements go on",
            )
            return None

    def _agc_factors(self, grads: list[list[Tensor | None]], segments: list[Segment], parts: dict[tuple[str, str], Tensor]) -> list[Tensor | None] | None:
        """AGC's unit-wise factors and the clipped squared norms (an optional part: if it
        fails, the records go on, with no clip)."""
        flat = [g for gl in grads for g in gl]
        params = [p for grp in self._groups.groups for p in grp.params]
        goes_on = "Gradients are no longer clipped; the gradient norms and checks go on"
        what = "unit-wise clipping (policy 'agc')"
        got = self._optional(("", "agc"), what, agc_factors, params, flat, self._policy, goes_on=goes_on)
        if got is None:
            return None
        factors, clipped_sq = got
        segments.append(Segment("clipped_sq", int(clipped_sq.numel())))
        parts[("clipped_sq", "")] = clipped_sq
        return factors

    def _gather(self, segments: list[Segment], parts: dict[tuple[str, str], Tensor]) -> None:
        """Add what the recurrent probes gathered this step (combined across ranks under
        DDP / FSDP), each measurement on its own: one that fails turns off alone."""
        names: list[str] = []
        sqs: list[Tensor] = []
        gate_probes: list[Probe] = []
        gate_values: list[Tensor] = []
        for probe in self._probes:
            what = f"the per-timestep profile of recurrent layer {probe.name!r}"
            sq = self._optional((probe.name, "temporal"), what, temporal_of, probe)
            if sq is not None and sq.numel() > 0:
                names.append(probe.name)
                sqs.append(sq)
            what = f"the {probe.gate_name}-gate statistics of recurrent layer {probe.name!r}"
            g = self._optional((probe.name, "gates"), what, gates_of, probe)
            if g is not None:
                gate_probes.append(probe)
                gate_values.append(g)
        profiled = bool(self._probes) and bool(profile_due(self._next_step(), self._monitor.options.profile_every))
        if self._world > 1 and profiled:
            # Every rank takes this branch on the same steps (the step counter is shared),
            # so the collectives never wait for a rank that skipped them.
            got = _distributed.allreduce_profiles(self._world, self._groups.device, [int(s.shape[0]) for s in sqs], sqs, gate_values)
            if got is None:
                self._world = 1
            else:
                sqs, gate_values = got
                names = names if sqs else []
                gate_probes = gate_probes if gate_values else []
        for name, sq in zip(names, sqs):
            segments.append(Segment("temporal", int(sq.shape[0]), key=name))
            parts[("temporal", name)] = sq
        if profiled:
            for probe in self._probes:
                if isinstance(probe, SequenceProbe):
                    what = f"the spectral norms of recurrent layer {probe.name!r}"
                    got_s = self._optional((probe.name, "spectral"), what, spectral_of, probe)
                    for wname, labels, sigma in got_s or []:
                        key = f"{probe.name}.{wname}"
                        segments.append(Segment("spectral", len(labels), key=key, labels=labels))
                        parts[("spectral", key)] = sigma
        for probe, g in zip(gate_probes, gate_values):
            segments.append(Segment("gates", 2, key=probe.name, labels=(probe.gate_name,)))
            parts[("gates", probe.name)] = g
        if profiled:
            props: list[tuple[str, tuple[str, ...], Tensor, Tensor]] = []
            sizes: list[int] = []
            for probe in self._probes:
                what = f"the propagation gains of recurrent layer {probe.name!r}"
                got_p = self._optional((probe.name, "propagation"), what, propagation_of, probe)
                sizes.append(0 if got_p is None else int(got_p[1].numel()))
                if got_p is not None:
                    props.append((probe.name, *got_p))
            if self._world > 1:  # every rank reports the same numbers, over every rank's sequences
                combined = combine_ranks(self._world, self._groups.device, sizes, [(g, t) for _, _, g, t in props])
                if combined is None:
                    self._world = 1
                else:
                    props = [(n, labels, g, t) for (n, labels, _, _), (g, t) in zip(props, combined)] if combined else []
            for name, labels, gains, top in props:
                segments.append(Segment("propagation", int(gains.numel()), key=name, labels=labels))
                parts[("propagation", name)] = gains
                segments.append(Segment("max_gains", int(top.numel()), key=name, labels=labels))
                parts[("max_gains", name)] = top

    def _drop_grads(self) -> None:
        """Make the coming optimizer step a no-op: every gradient becomes None.

        Zeroing is not enough: weight decay and momentum would still move the weights and
        Adam would still advance its state; with ``grad is None`` every built-in optimizer
        skips the parameter entirely.
        """
        for p in self._groups.params:
            p.grad = None
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    def _break(self, what: str, exc: BaseException) -> None:
        """The core failed: stop measuring this model (training goes on untouched)."""
        if not self._broken:
            self._broken = True
            for probe in self._probes:  # the step counter stops: stop probing too
                probe.enabled = False
                probe.rearm()
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


def _on_stack(frame: Any, start: Any) -> bool:
    """Is ``frame`` one of ``start``'s callers (or ``start`` itself)?"""
    f = start
    for _ in range(64):
        if f is None:
            return False
        if f is frame:
            return True
        f = f.f_back
    return False


def attach(model: nn.Module, optimizer: object | None, monitor: MonitorPort) -> TorchAttachment:
    """Attach ``monitor`` to ``model`` (and ``optimizer``); see :class:`TorchAttachment`."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradwatchError(
            f"optimizer must be a torch.optim.Optimizer or None; received {type(optimizer).__name__}. Without an "
            "optimizer, call watch.step() after backward() and before optimizer.step()."
        )
    return TorchAttachment(model, optimizer, monitor)
