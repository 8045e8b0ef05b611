"""The Monitor: the step pipeline every backend feeds.

Per step it takes :class:`~gradwatch.StepStats` (what a backend measured), builds the
:class:`~gradwatch.StepRecord`, decides the clip (or takes the device's decision), runs
the detectors and hands record and events to the dispatcher (sinks, windows, rate
limits, plugins). Numpy users feed it gradients with :meth:`Monitor.observe`.

Cost: one ``process`` call is a handful of numpy calls over vectors of parameters and
layers; no Python loop runs per parameter, and no dict is built per step (the record's
mappings are views over numpy vectors with shared name indices).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import pluggy

from gradwatch import _exit
from gradwatch._arrays import apply_decision, stats_from_arrays
from gradwatch._binding import Binding, infer_layer
from gradwatch._layout import StepStats
from gradwatch._state import STATE_VERSION, check_version
from gradwatch.arrayops import NUMPY
from gradwatch.dispatch import Dispatcher
from gradwatch.errors import ConfigError, GradwatchError, NonFiniteGradientError
from gradwatch.events import GradEvent
from gradwatch.formatting import nonfinite_message
from gradwatch.options import Options, profile_due
from gradwatch.plugins import IsolatedCaller, get_plugin_manager
from gradwatch.policies import HostPolicy
from gradwatch.records import ClipDecision, NormMap, StepRecord, TemporalProfile
from gradwatch.registry import build_detectors, build_sinks, resolve_policy
from gradwatch.sinks import now_iso
from gradwatch.view import ReadOnlyView

__all__ = ["Monitor", "infer_layer"]

logger = logging.getLogger("gradwatch")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Monitor:
    """Measures, judges and (with a policy) decides the clipping of every optimizer step.

    Build one with the options of the README (``Monitor(policy="zclip", log_every=10)``),
    or let ``gradwatch.watch`` build it. Backends call :meth:`bind` once and
    :meth:`process` once per step; numpy users call :meth:`observe`.
    """

    def __init__(self, *, plugin_manager: pluggy.PluginManager | None = None, **options: Any) -> None:
        self.options = Options.from_kwargs(**options)
        pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self.policy: Any = resolve_policy(self.options.policy, self.options, pm)
        unitwise = self.policy is not None and getattr(self.policy, "unitwise", False)
        self._host = HostPolicy(self.policy) if self.policy is not None and not unitwise else None
        self._device: Any = None
        self._detectors = build_detectors(self.options, pm)
        #: Free-form facts a backend adds for the run file header (backend, layers, ...).
        self.meta: dict[str, Any] = {}
        #: Facts read when an alert needs them, not frozen at attach (see ReadOnlyView.live).
        self.live: dict[str, Any] = {}
        self.view = ReadOnlyView(self)
        self._records: deque[StepRecord] = deque(maxlen=self.options.keep)
        self._events: deque[GradEvent] = deque(maxlen=self.options.keep)
        self._step = 0
        self.bind(())
        sinks = build_sinks(self.options.sinks, pm, self.view)
        self._dispatch = Dispatcher(sinks, IsolatedCaller(pm), self.view, log_every=self.options.log_every, alert_every=self.options.alert_every)
        self.set_distributed(int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1))
        self._closed = False
        _exit.track(self)  # closed at interpreter exit if the user does not: the last window reaches the sinks

    # ------------------------------------------------------------------ set-up
    def bind(self, names: Sequence[str], layers: Sequence[str] | None = None) -> None:
        """Declare the parameters (framework names, in the order of the norms that
        :meth:`process` will receive) and the layer each belongs to.

        Called at attach, and again whenever the set of parameters changes; the index
        built here is what makes each step free of per-parameter Python work.
        """
        self._binding = Binding(names, layers)

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Tell the monitor its place in a distributed job: every rank computes the same
        records, but only rank 0 writes to the sinks unless ``all_ranks=True``."""
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._dispatch.writes = self.rank == 0 or self.options.all_ranks

    def decide_on_device(self, runner: Any) -> None:
        """Let ``runner`` (a backend's on-device policy runner) own the policy state from
        now on, starting from the current state; ``None`` brings the state back here."""
        if self._host is None:
            return
        if runner is not None:
            runner.load_state_dict(self._active().state_dict())
            self._device = runner
        elif self._device is not None:
            self._host.load_state_dict(self._device.state_dict())
            self._device = None

    def _active(self) -> Any:
        return self._device if self._device is not None else self._host

    def layer_of(self, param: str) -> str | None:
        """The layer a bound parameter belongs to."""
        return self._binding.param_layer.get(param)

    def set_pending_reader(self, reader: Any) -> None:
        """Let a backend that keeps quiet steps' statistics on the device (``reader()``
        records them) be asked first whenever someone reads the step count, the records or
        the events, so those are always up to date (None: no such backend)."""
        self._pending_reader = reader

    def _read_pending(self) -> None:
        reader = getattr(self, "_pending_reader", None)
        if reader is None or getattr(self, "_reading", False):
            return  # (inside the reader itself: its own records are being made)
        self._reading = True
        try:
            reader()
        except Exception as exc:  # noqa: BLE001 - reading is optional here, training goes on
            logger.error("reading the pending statistics failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._reading = False

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (statistics still on the device are recorded first)."""
        self._read_pending()
        return self._step

    step = step_count  # as MonitorView.step
    names = property(lambda self: self._binding.names, doc="Bound parameter names, in bound order.")
    layers = property(lambda self: self._binding.layers, doc="Layer names, in order of first appearance.")
    policy_name = property(lambda self: None if self.policy is None else self.policy.name, doc="The policy's registry name, or None.")
    next_step = property(lambda self: self._step + 1, doc="The step number the next process() call records.")
    sinks = property(lambda self: list(self._dispatch.sinks))

    def profile_due(self, step: int | None = None) -> bool:
        """True when ``step`` (default: the next one) gets temporal profiles and spectral
        norms (see :func:`gradwatch.options.profile_due`)."""
        return bool(profile_due(self.next_step if step is None else step, self.options.profile_every))

    def header(self) -> dict[str, Any]:
        """What the run file's header line says about this run."""
        from gradwatch import __version__

        return {
            "gradwatch": __version__,
            "created": now_iso(),
            "run_name": self.options.run_name,
            "options": self.options.public(),
            "policy": repr(self.policy) if self.policy is not None else None,
            "rank": self.rank,
            "world_size": self.world_size,
            **self.meta,
        }

    # ---------------------------------------------------------------- hot path
    def process(self, stats: StepStats) -> StepRecord:
        """Record one optimizer step and decide its fate (see docs/BACKENDS.md).

        Returns the record: ``record.clip.scale`` is the factor to multiply every gradient
        by, ``record.skipped`` says the optimizer step must not happen. With
        ``on_nonfinite="raise"`` a non-finite step raises ``NonFiniteGradientError`` here,
        after its events are emitted and before the caller changes anything.
        """
        if self._closed:
            raise GradwatchError("This gradwatch Monitor is closed; create a new one to go on recording.")
        step = self._step + 1
        sq = np.asarray(stats.sq_norms, dtype=np.float64).reshape(-1)
        if sq.shape[0] != len(self._binding.names):
            if self._binding.names:
                raise GradwatchError(f"Monitor.process received {sq.shape[0]} norms but {len(self._binding.names)} parameters are bound.")
            self.bind([f"param_{i}" for i in range(sq.shape[0])])
        present = None if stats.present is None else np.asarray(stats.present, dtype=bool).reshape(-1)
        if present is not None:
            if present.shape[0] != sq.shape[0]:
                raise GradwatchError(f"Monitor.process received {present.shape[0]} presence flags for {sq.shape[0]} norms.")
            if present.all():
                present = None
            else:  # absent parameters count for nothing, not for zero
                sq = np.where(present, sq, 0.0)
        with np.errstate(invalid="ignore"):
            n = np.sqrt(sq)
        total = float(sq.sum())
        global_norm = math.sqrt(total) if total >= 0 else math.nan
        bad = ~np.isfinite(n) if stats.nonfinite is None else np.asarray(stats.nonfinite, dtype=bool).reshape(-1)
        if present is not None:
            bad = bad & present
        nonfinite = tuple(self._binding.names[i] for i in np.flatnonzero(bad)) if bad.any() else ()
        mode = self.options.on_nonfinite
        raising = bool(nonfinite) and mode == "raise"
        skipped = stats.skipped if stats.skipped is not None else bool(nonfinite) and mode == "skip"
        clip = None if (skipped or raising) else self._decide(stats, global_norm)
        layer_n = np.sqrt(np.bincount(self._binding.layer_of_param, weights=sq, minlength=len(self._binding.layers)))
        if present is None:
            param_norms, layer_norms = NormMap(self._binding.index, n), NormMap(self._binding.layer_index, layer_n)
        else:
            p_index, p_pos, l_index, l_pos = self._binding.subset(present)
            param_norms, layer_norms = NormMap(p_index, n[p_pos]), NormMap(l_index, layer_n[l_pos])
        record = StepRecord(
            step=step,
            global_norm=global_norm,
            param_norms=param_norms,
            layer_norms=layer_norms,
            clip=clip,
            skipped=bool(skipped),
            nonfinite=nonfinite,
            temporal=self._profiles(stats) if (stats.temporal or stats.propagation) else _EMPTY,
            spectral=MappingProxyType({k: float(v) for k, v in stats.spectral.items()}) if stats.spectral else _EMPTY,
            gates=MappingProxyType(dict(stats.gates)) if stats.gates else _EMPTY,
        )
        self._step = step
        self._records.append(record)
        self._judge(record)
        self._dispatch.record(record)
        if raising:
            self._dispatch.flush()  # the loop is about to stop: every step so far reaches the sinks now
            layer = self.layer_of(nonfinite[0])
            raise NonFiniteGradientError(nonfinite_message(step, nonfinite, layer, "raise"), step=step, params=nonfinite, layer=layer)
        return record

    def _decide(self, stats: StepStats, global_norm: float) -> ClipDecision | None:
        pol = self.policy
        if pol is None:
            return None
        if stats.decision is not None:
            d = stats.decision
            return d if d.policy == pol.name else ClipDecision(d.threshold, d.scale, pol.name)
        if getattr(pol, "unitwise", False):
            if stats.clipped_sq_norms is None:
                return None
            after = math.sqrt(float(np.sum(stats.clipped_sq_norms)))
            with np.errstate(all="ignore"):
                clip = pol.decision(np.float64(global_norm), np.float64(after), NUMPY)
            return ClipDecision(float(clip.threshold), float(clip.scale), pol.name)
        return self._host.decide(global_norm)  # type: ignore[union-attr]

    def _profiles(self, stats: StepStats) -> Mapping[str, TemporalProfile]:
        """One profile per recurrent layer measured this step: its input-gradient norms
        (sensitivity) and the gains of each of its recurrences (propagation)."""
        ratio = self.options.vanish_ratio
        out: dict[str, TemporalProfile] = {}
        for layer in dict.fromkeys([*stats.temporal, *stats.propagation]):
            norms = stats.temporal.get(layer, ())
            if isinstance(norms, TemporalProfile):
                out[layer] = norms
            else:
                out[layer] = TemporalProfile.build(norms, stats.propagation.get(layer), ratio, stats.max_gains.get(layer))
        return MappingProxyType(out)

    def _judge(self, record: StepRecord) -> None:
        for det in list(self._detectors):
            try:
                events = det.check(record, self.view)
            except Exception as exc:  # noqa: BLE001 - a detector bug must not stop training
                self._detectors.remove(det)
                logger.error("detector %r raised %s: %s; it is disabled.", getattr(det, "name", det), type(exc).__name__, exc)
                continue
            for ev in events:
                self.emit(ev)

    def emit(self, event: GradEvent) -> None:
        """Rate-limit ``event`` and, if it passes, store it, write it to the sinks and
        announce it to plugins. Backends may emit their own events through here."""
        admitted = self._dispatch.event(event)
        if admitted is not None:
            self._events.append(admitted)

    # -------------------------------------------------------------- numpy path
    def observe(
        self,
        grads: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        *,
        temporal: Mapping[str, Sequence[float]] | None = None,
        propagation: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        spectral: Mapping[str, float] | None = None,
        unit_axis: int = 0,
        max_gains: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    ) -> StepRecord:
        """Record one step from gradients given as arrays (anything ``np.asarray`` takes).

        ``params`` (same keys) is needed only by unit-wise policies (AGC), which compare
        each unit's gradient with its weights; ``unit_axis`` says which axis indexes the
        units (0 for ``(out, in)`` weights). Apply the decision with :meth:`clip_gradients`.
        ``temporal`` (layer -> per-timestep norms of dL/dx_t) and ``propagation`` (layer ->
        recurrence -> RMS gains over j steps back, and ``max_gains`` the same keys -> largest
        singular values, on which rate and horizon are fitted; see
        :class:`~gradwatch.Propagation` and :mod:`gradwatch.through_time.reference`) are what
        a framework without a backend can measure itself.
        """
        names = tuple(grads)
        if names != self._binding.names:
            self.bind(names)
        return self.process(stats_from_arrays(grads, params, self.policy, unit_axis, temporal, propagation, spectral, max_gains))

    def clip_gradients(
        self, grads: Mapping[str, Any], record: StepRecord, params: Mapping[str, Any] | None = None, unit_axis: int = 0
    ) -> dict[str, np.ndarray]:
        """The gradients as they should reach the optimizer after ``record``'s decision:
        unchanged without a policy, scaled by ``record.clip.scale``, or clipped unit-wise
        for AGC. (A skipped record means: do not apply them at all.)"""
        return apply_decision(grads, record, self.policy, params, unit_axis)

    # ------------------------------------------------------------ reading & state
    @property
    def records(self) -> list[StepRecord]:
        """Recent records, oldest first (at most ``keep``; pending device statistics first)."""
        self._read_pending()
        return list(self._records)

    @property
    def events(self) -> list[GradEvent]:
        """Events emitted so far (the most recent ``keep``; pending device statistics first)."""
        self._read_pending()
        return list(self._events)

    def _policy_state(self) -> dict[str, Any] | None:
        if self.policy is None:
            return None
        if self._host is None:  # unit-wise: stateless, saved for the resume check
            return self.policy.dump_state(None)  # type: ignore[no-any-return]
        return self._active().state_dict()  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly as this one would: step
        counter, policy state, detector statistics, rate limiter, current window.
        Plain JSON values."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "policy": self._policy_state(),
            "detectors": {getattr(d, "name", type(d).__name__): d.state_dict() for d in self._detectors},
            **self._dispatch.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (e.g. after ``json.loads``)."""
        check_version(state, "Monitor.load_state_dict")
        saved = state.get("policy")
        if (saved is None) != (self.policy is None):
            theirs = None if saved is None else saved.get("policy")
            raise ConfigError(
                f"The saved gradwatch state was made with policy {theirs!r} but this watch has policy "
                f"{None if self.policy is None else self.policy.name!r}; pass the same policy option when resuming.",
                option="policy",
                value=self.options.policy,
            )
        if self.policy is not None:
            if self._host is None:
                self.policy.load_state(saved)
            else:
                self._active().load_state_dict(saved)
        det_states = state.get("detectors", {})
        for d in self._detectors:
            key = getattr(d, "name", type(d).__name__)
            if key in det_states:
                d.load_state_dict(det_states[key])
        self._dispatch.load_state_dict(state)
        self._step = int(state["step"])
        self._dispatch.resume(self._step)  # the run file continues (appends) instead of starting over

    def summary(self) -> dict[str, Any]:
        """Steps recorded and the alerts still held back by rate limiting (kind, layer,
        count, first step): what a sink's ``write_summary`` receives at close."""
        return {"steps": self._step, "suppressed": self._dispatch.limiter.pending()}

    def flush(self) -> None:
        """Write the current (partial) window to the sinks now."""
        self._dispatch.flush()

    def close(self) -> None:
        """Flush the last partial window, report alerts still held back by rate
        limiting, and close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _exit.untrack(self)
        self._dispatch.close(self.summary())

    def __del__(self) -> None:
        # Dropped without close() (a sweep that rebinds `watch` each trial): the last
        # window still reaches the sinks. Files stay open until this runs (their
        # descriptors have no finalizer of their own that could close them first).
        if getattr(self, "_closed", True) is False:
            try:
                self.close()
            except Exception:  # noqa: BLE001, S110 - nothing may escape a finalizer
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"Monitor(step={self._step}, policy={self.policy!r}, params={len(self._binding.names)})"

