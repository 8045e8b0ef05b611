"""The Monitor: the framework-agnostic engine every backend feeds.

Per step it takes per-parameter squared gradient norms (plus non-finite flags, temporal
profiles, spectral norms and gate statistics when the backend has them), builds the
``StepRecord``, runs the detectors and the clipping policy, emits events at once, and
every ``log_every`` steps flushes a window-summarised record to the sinks. It is usable
from plain numpy with :meth:`Monitor.observe`.

Cost: one ``process`` call is a handful of numpy calls over vectors of parameters and
layers; no Python loop runs per parameter, and no dict is built per step (the record's
mappings are views over numpy vectors with shared name indices).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import deque
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import pluggy

from gradwatch import _numerics
from gradwatch.detectors import fmt, nonfinite_message
from gradwatch.errors import ConfigError, GradwatchError, NonFiniteGradientError
from gradwatch.events import GradEvent
from gradwatch.options import Options
from gradwatch.plugins import IsolatedCaller, get_plugin_manager
from gradwatch.policies import ClipPolicy, ZClip
from gradwatch.records import ClipDecision, GateStats, NormMap, StepRecord, TemporalProfile, WindowStats
from gradwatch.sinks import LoggingSink, MemorySink, Sink, now_iso

__all__ = ["Monitor", "infer_layer"]

logger = logging.getLogger("gradwatch")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
STATE_VERSION = 1


def infer_layer(name: str) -> str:
    """The layer a parameter belongs to, from its name: ``"enc.lstm.weight_hh_l0"`` ->
    ``"enc.lstm"``, ``"lstm/kernel"`` -> ``"lstm"``; a bare name is its own layer."""
    for sep in ("/", "."):
        if sep in name:
            return name.rsplit(sep, 1)[0]
    return name


class _Window:
    """Accumulates the statistics of the steps between two flushes."""

    __slots__ = ("first", "steps", "n_finite", "total", "lo", "hi", "clipped", "skipped", "nonfinite", "temporal", "spectral", "gates", "last")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.first = 0
        self.steps = 0
        self.n_finite = 0
        self.total = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.clipped = 0
        self.skipped = 0
        self.nonfinite = 0
        self.temporal: Mapping[str, TemporalProfile] = _EMPTY
        self.spectral: Mapping[str, float] = _EMPTY
        self.gates: Mapping[str, GateStats] = _EMPTY
        self.last: StepRecord | None = None

    def add(self, r: StepRecord) -> None:
        if self.steps == 0:
            self.first = r.step
        self.steps += 1
        g = r.global_norm
        if math.isfinite(g):
            self.n_finite += 1
            self.total += g
            if g < self.lo:
                self.lo = g
            if g > self.hi:
                self.hi = g
        if r.clip is not None and r.clip.scale < 1.0:
            self.clipped += 1
        if r.skipped:
            self.skipped += 1
        if r.nonfinite:
            self.nonfinite += 1
        if r.temporal:
            self.temporal = r.temporal
        if r.spectral:
            self.spectral = r.spectral
        if r.gates:
            self.gates = r.gates
        self.last = r

    def summary(self) -> StepRecord | None:
        r = self.last
        if r is None:
            return None
        nan = math.nan
        stats = WindowStats(
            first_step=self.first,
            last_step=r.step,
            steps=self.steps,
            norm_min=self.lo if self.n_finite else nan,
            norm_mean=self.total / self.n_finite if self.n_finite else nan,
            norm_max=self.hi if self.n_finite else nan,
            clipped=self.clipped,
            skipped=self.skipped,
            nonfinite=self.nonfinite,
        )
        return dataclasses.replace(
            r,
            window=stats,
            temporal=r.temporal or self.temporal,
            spectral=r.spectral or self.spectral,
            gates=r.gates or self.gates,
        )


class _RateLimiter:
    """At most one alert per ``every`` steps for each (kind, layer); repeats are counted
    and reported with the next alert that gets through, or at close."""

    def __init__(self, every: int) -> None:
        self.every = every
        # key -> [last emitted step, suppressed count, first suppressed step]
        self.state: dict[str, list[int]] = {}

    def admit(self, event: GradEvent) -> GradEvent | None:
        if self.every == 0:
            return event
        key = f"{event.kind}|{event.layer or ''}"
        ent = self.state.get(key)
        if ent is None or event.step - ent[0] >= self.every:
            if ent is not None and ent[1]:
                n = ent[1]
                event = dataclasses.replace(
                    event,
                    suppressed=n,
                    message=f"{event.message} ({n} similar alert{'s' if n > 1 else ''} suppressed since step {ent[2]}.)",
                )
            self.state[key] = [event.step, 0, 0]
            return event
        if ent[1] == 0:
            ent[2] = event.step
        ent[1] += 1
        return None

    def pending(self) -> list[tuple[str, int, int]]:
        """(key, suppressed count, first suppressed step) not yet reported."""
        return [(k, v[1], v[2]) for k, v in self.state.items() if v[1]]

    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = {k: [int(x) for x in v] for k, v in state.items()}


class Monitor:
    """Measures, judges and (with a policy) decides the clipping of every optimizer step.

    Build one with the options of the README (``Monitor(policy="zclip", log_every=10)``),
    or let ``gradwatch.watch`` build it. Backends call :meth:`bind` once and
    :meth:`process` once per step; numpy users call :meth:`observe`.
    """

    def __init__(self, *, plugin_manager: pluggy.PluginManager | None = None, **options: Any) -> None:
        self.options = Options.from_kwargs(**options)
        self._pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self._hooks = IsolatedCaller(self._pm)
        self.policy: ClipPolicy | None = self._resolve_policy(self.options.policy)
        self._detectors = [cls(self.options) for cls in self._registered("gradwatch_register_detectors")]
        self._sinks: list[Sink] = self._resolve_sinks(self.options.sinks)
        self._records: deque[StepRecord] = deque(maxlen=self.options.keep)
        self._events: deque[GradEvent] = deque(maxlen=self.options.keep)
        self._step = 0
        self._names: tuple[str, ...] = ()
        self._index: Mapping[str, int] = {}
        self._layers: tuple[str, ...] = ()
        self._layer_index: Mapping[str, int] = {}
        self._layer_of_param: np.ndarray = np.zeros(0, dtype=np.intp)
        self._window = _Window()
        self._limiter = _RateLimiter(self.options.alert_every)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self._writes = self.rank == 0 or self.options.all_ranks
        #: Free-form facts a backend adds for the run file header (backend, layers, ...).
        self.meta: dict[str, Any] = {}
        self._closed = False

    # ------------------------------------------------------------------ set-up
    def _registered(self, hook: str) -> list[type]:
        out: list[type] = []
        for lst in getattr(self._pm.hook, hook)():
            out.extend(lst or ())
        return out

    def _resolve_policy(self, spec: Any) -> ClipPolicy | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            registry = {getattr(c, "name", None): c for c in self._registered("gradwatch_register_policies")}
            cls = registry.get(spec)
            if cls is not None:
                if spec == "fixed":
                    return cls(self.options.max_norm)
                if cls is ZClip:
                    return cls(max_norm=self.options.max_norm if self.options.max_norm_given else None)
                return cls()
            resolved = self._pm.hook.gradwatch_resolve_policy(spec=spec, options=self.options)
            if resolved is not None:
                return resolved
            raise ConfigError(
                f"gradwatch option policy={spec!r} is not a known policy: expected None, one of "
                f"{', '.join(repr(k) for k in sorted(k for k in registry if k))}, or a policy object from "
                f"gradwatch.policies.",
                option="policy",
                value=spec,
            )
        if all(callable(getattr(spec, m, None)) for m in ("update", "state_dict", "load_state_dict")) and hasattr(
            spec, "name"
        ):
            return spec  # type: ignore[no-any-return]
        resolved = self._pm.hook.gradwatch_resolve_policy(spec=spec, options=self.options)
        if resolved is not None:
            return resolved
        raise ConfigError(
            f"gradwatch option policy={spec!r} is not a policy: expected None, a name such as 'zclip', or an "
            f"object with name, update(norm), state_dict() and load_state_dict() (see gradwatch.policies).",
            option="policy",
            value=spec,
        )

    def _resolve_sinks(self, specs: Sequence[Any]) -> list[Sink]:
        classes: dict[Any, Any] = {getattr(c, "scheme", None): c for c in self._registered("gradwatch_register_sinks")}
        sinks: list[Sink] = []
        for spec in specs:
            if isinstance(spec, str):
                scheme, _, arg = spec.partition(":")
                cls = classes.get(scheme)
                if cls is None:
                    raise ConfigError(
                        f"gradwatch option sinks: {spec!r} is not a known sink: expected one of "
                        f"{', '.join(sorted(repr(k + (':...' if k in ('jsonl', 'tensorboard') else '')) for k in classes if k))}"
                        f" or a sink object.",
                        option="sinks",
                        value=spec,
                    )
                sinks.append(cls.from_spec(arg or None, self))
            elif all(callable(getattr(spec, m, None)) for m in ("write_record", "write_event", "close")):
                sinks.append(spec)
            else:
                raise ConfigError(
                    f"gradwatch option sinks: {spec!r} is neither a sink name nor an object with write_record, "
                    f"write_event and close.",
                    option="sinks",
                    value=spec,
                )
        return sinks

    def bind(self, names: Sequence[str], layers: Sequence[str] | None = None) -> None:
        """Declare the parameters (framework names, in the order of the norms that
        :meth:`process` will receive) and the layer each belongs to.

        Called once at attach, and again only if the set of parameters changes; the
        index built here is what makes each step free of per-parameter Python work.
        """
        names = tuple(names)
        layers = tuple(layers) if layers is not None else tuple(infer_layer(n) for n in names)
        if len(layers) != len(names):
            raise GradwatchError(f"Monitor.bind: {len(names)} names but {len(layers)} layers.")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise GradwatchError(f"Monitor.bind: parameter name {dup!r} appears twice.")
        uniq = tuple(dict.fromkeys(layers))
        self._names = names
        self._index = MappingProxyType({n: i for i, n in enumerate(names)})
        self._layers = uniq
        self._layer_index = MappingProxyType({n: i for i, n in enumerate(uniq)})
        pos = {n: i for i, n in enumerate(uniq)}
        self._layer_of_param = np.array([pos[layer] for layer in layers], dtype=np.intp)
        self._param_layer = dict(zip(names, layers))

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Tell the monitor its place in a distributed job: every rank computes the same
        records, but only rank 0 writes to the sinks unless ``all_ranks=True``."""
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._writes = self.rank == 0 or self.options.all_ranks

    def layer_of(self, param: str) -> str | None:
        """The layer a bound parameter belongs to."""
        return getattr(self, "_param_layer", {}).get(param)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def next_step(self) -> int:
        """The step number the next :meth:`process` call will record (steps count from 1)."""
        return self._step + 1

    @property
    def step_count(self) -> int:
        """Optimizer steps recorded so far."""
        return self._step

    def profile_due(self, step: int | None = None) -> bool:
        """True when ``step`` (default: the next one) gets temporal profiles and spectral
        norms: the first step, then every ``profile_every`` steps."""
        every = self.options.profile_every
        if every <= 0:
            return False
        s = self.next_step if step is None else step
        return s == 1 or s % every == 0

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
    def process(
        self,
        sq_norms: Sequence[float] | np.ndarray | None = None,
        *,
        norms: Sequence[float] | np.ndarray | None = None,
        nonfinite: Sequence[bool] | np.ndarray | None = None,
        temporal: Mapping[str, Sequence[float] | np.ndarray | TemporalProfile] | None = None,
        spectral: Mapping[str, float] | None = None,
        gates: Mapping[str, GateStats] | None = None,
        clipped_sq_norms: Sequence[float] | np.ndarray | None = None,
        decision: ClipDecision | None = None,
        skipped: bool | None = None,
    ) -> StepRecord:
        """Record one optimizer step and decide its fate (see docs/BACKENDS.md).

        Give either ``sq_norms`` (squared L2 norms) or ``norms`` of each bound parameter's
        gradient, before clipping. Returns the record: ``record.clip.scale`` is the factor
        to multiply the gradients by, ``record.skipped`` says to skip the optimizer step.
        Raises :class:`NonFiniteGradientError` (only) when ``on_nonfinite="raise"`` and a
        gradient is not finite, after the event has been emitted.
        """
        if self._closed:
            raise GradwatchError("This gradwatch Monitor is closed; create a new watch to go on measuring.")
        step = self._step + 1
        if norms is not None:
            n = np.asarray(norms, dtype=np.float64).reshape(-1)
            sq = n * n
        elif sq_norms is not None:
            sq = np.asarray(sq_norms, dtype=np.float64).reshape(-1)
            n = np.sqrt(sq)
        else:
            raise GradwatchError("Monitor.process needs sq_norms or norms.")
        if sq.shape[0] != len(self._names):
            if not self._names:
                self.bind([f"param_{i}" for i in range(sq.shape[0])])
            else:
                raise GradwatchError(
                    f"Monitor.process received {sq.shape[0]} norms but {len(self._names)} parameters are bound."
                )
        total = float(sq.sum())
        global_norm = math.sqrt(total) if total >= 0 else math.nan
        bad = ~np.isfinite(n) if nonfinite is None else np.asarray(nonfinite, dtype=bool).reshape(-1)
        nonfinite_names: tuple[str, ...] = ()
        if bad.any():
            names = self._names
            nonfinite_names = tuple(names[i] for i in np.flatnonzero(bad))
        o = self.options
        if skipped is None:
            skipped = bool(nonfinite_names) and o.on_nonfinite == "skip"
        clip: ClipDecision | None
        if decision is not None:
            clip = decision
        elif self.policy is None or skipped or (nonfinite_names and o.on_nonfinite == "raise"):
            clip = None
        elif getattr(self.policy, "unitwise", False) and clipped_sq_norms is not None:
            after = math.sqrt(float(np.asarray(clipped_sq_norms, dtype=np.float64).sum()))
            clip = self.policy.decision_from_norms(global_norm, after)  # type: ignore[attr-defined]
        else:
            clip = self.policy.update(global_norm)
        layer_sq = np.bincount(self._layer_of_param, weights=sq, minlength=len(self._layers))
        record = StepRecord(
            step=step,
            global_norm=global_norm,
            param_norms=NormMap(self._index, n),
            layer_norms=NormMap(self._layer_index, np.sqrt(layer_sq)),
            clip=clip,
            skipped=bool(skipped),
            nonfinite=nonfinite_names,
            temporal=self._profiles(temporal) if temporal else _EMPTY,
            spectral=MappingProxyType({k: float(v) for k, v in spectral.items()}) if spectral else _EMPTY,
            gates=MappingProxyType(dict(gates)) if gates else _EMPTY,
        )
        self._step = step
        self._records.append(record)
        self._judge(record)
        self._window.add(record)
        if step % o.log_every == 0:
            self._flush()
        self._hooks.call("gradwatch_step_recorded", record=record, monitor=self)
        if nonfinite_names and o.on_nonfinite == "raise":
            layer = self.layer_of(nonfinite_names[0])
            raise NonFiniteGradientError(
                nonfinite_message(step, nonfinite_names, layer, "raise"), step=step, params=nonfinite_names, layer=layer
            )
        return record

    def _profiles(self, temporal: Mapping[str, Any]) -> Mapping[str, TemporalProfile]:
        return MappingProxyType(
            {k: v if isinstance(v, TemporalProfile) else TemporalProfile.from_norms(v) for k, v in temporal.items()}
        )

    def _judge(self, record: StepRecord) -> None:
        events: list[GradEvent] = []
        for det in self._detectors:
            try:
                events.extend(det.check(record, self))
            except Exception as exc:  # noqa: BLE001 - a detector bug must not stop training
                self._detectors = [d for d in self._detectors if d is not det]
                logger.error("[gradwatch] detector %r raised %s: %s; it is disabled.", getattr(det, "name", det), type(exc).__name__, exc)
        clip = record.clip
        if clip is not None and clip.scale < 1.0:
            events.append(
                GradEvent(
                    kind="clipped",
                    step=record.step,
                    severity=logging.INFO,
                    message=(
                        f"Step {record.step}: gradient norm {fmt(record.global_norm)} clipped by policy "
                        f"{clip.policy!r} (threshold {fmt(clip.threshold)}, scale {fmt(clip.scale)})."
                    ),
                    value=record.global_norm,
                    threshold=clip.threshold,
                )
            )
        if record.skipped:
            first = record.nonfinite[0] if record.nonfinite else None
            events.append(
                GradEvent(
                    kind="skipped",
                    step=record.step,
                    severity=logging.WARNING,
                    message=(
                        f"Step {record.step} skipped"
                        + (f" because of a non-finite gradient in {first!r}" if first else "")
                        + ": weights and optimizer state are unchanged."
                    ),
                    layer=self.layer_of(first) if first else None,
                    param=first,
                    value=record.global_norm,
                )
            )
        for ev in events:
            self.emit(ev)

    def emit(self, event: GradEvent) -> None:
        """Rate-limit ``event`` and, if it passes, store it, write it to the sinks and
        announce it to plugins. Backends may emit their own events through here."""
        admitted = self._limiter.admit(event)
        if admitted is None:
            return
        self._events.append(admitted)
        if self._writes:
            for sink in list(self._sinks):
                self._safe(sink, "write_event", admitted)
        self._hooks.call("gradwatch_event", event=admitted, monitor=self)

    def _safe(self, sink: Sink, method: str, arg: Any) -> None:
        try:
            getattr(sink, method)(arg)
        except Exception as exc:  # noqa: BLE001 - a sink must never reach the training loop
            if sink in self._sinks:
                self._sinks.remove(sink)
            logger.error(
                "[gradwatch] sink %s raised %s: %s; it is disabled for the rest of this run. Training goes on.",
                type(sink).__name__,
                type(exc).__name__,
                exc,
            )
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                pass

    def _flush(self) -> None:
        summary = self._window.summary()
        self._window.reset()
        if summary is None or not self._writes:
            return
        for sink in list(self._sinks):
            self._safe(sink, "write_record", summary)

    # -------------------------------------------------------------- numpy path
    def observe(
        self,
        grads: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        *,
        temporal: Mapping[str, Sequence[float]] | None = None,
        spectral: Mapping[str, float] | None = None,
        unit_axis: int = 0,
    ) -> StepRecord:
        """Record one step from gradients given as arrays (anything ``np.asarray`` takes).

        ``params`` (same keys) is needed only by unit-wise policies (AGC), which compare
        each unit's gradient with its weights; ``unit_axis`` says which axis indexes the
        units (0 for ``(out, in)`` weights). Apply the decision with :meth:`clip_gradients`.
        """
        names = tuple(grads)
        if names != self._names:
            self.bind(names)
        arrays = [np.asarray(g) for g in grads.values()]
        sq = np.fromiter((np.sum(np.square(a, dtype=np.float64)) for a in arrays), dtype=np.float64, count=len(arrays))
        nonfinite = None
        if not np.isfinite(sq).all():
            # A finite gradient can still overflow its square: look at the values.
            nonfinite = np.fromiter((not np.isfinite(a).all() for a in arrays), dtype=bool, count=len(arrays))
        clipped = None
        if self.policy is not None and getattr(self.policy, "unitwise", False):
            if params is None or set(params) != set(names):
                raise ConfigError(
                    f"policy {self.policy!r} clips unit by unit against the weights: pass params= with the same "
                    f"keys as the gradients to Monitor.observe.",
                    option="policy",
                    value=self.policy,
                )
            clipped = np.fromiter(
                (
                    np.sum(np.square(self._agc(params[k], g, unit_axis)))
                    for k, g in zip(names, arrays)
                ),
                dtype=np.float64,
                count=len(arrays),
            )
        return self.process(sq, nonfinite=nonfinite, temporal=temporal, spectral=spectral, clipped_sq_norms=clipped)

    def _agc(self, param: Any, grad: np.ndarray, unit_axis: int) -> np.ndarray:
        pol = self.policy
        return _numerics.agc_clip(np.asarray(param), grad, pol.clip_factor, pol.eps, unit_axis)  # type: ignore[union-attr]

    def clip_gradients(
        self, grads: Mapping[str, Any], record: StepRecord, params: Mapping[str, Any] | None = None, unit_axis: int = 0
    ) -> dict[str, np.ndarray]:
        """The gradients as they should reach the optimizer after ``record``'s decision:
        unchanged without a policy, scaled by ``record.clip.scale``, or clipped unit-wise
        for AGC. (A skipped record means: do not apply them at all.)"""
        if record.clip is None or (record.clip.scale >= 1.0 and not getattr(self.policy, "unitwise", False)):
            return {k: np.asarray(g) for k, g in grads.items()}
        if getattr(self.policy, "unitwise", False):
            if params is None:
                raise ConfigError("AGC needs params= to clip gradients.", option="policy", value=self.policy)
            return {k: self._agc(params[k], np.asarray(g), unit_axis) for k, g in grads.items()}
        s = record.clip.scale
        return {k: np.asarray(g) * s for k, g in grads.items()}

    # ------------------------------------------------------------ reading & state
    @property
    def records(self) -> list[StepRecord]:
        """Recent records, oldest first (at most ``keep``)."""
        return list(self._records)

    @property
    def events(self) -> list[GradEvent]:
        """Events emitted so far (the most recent ``keep``)."""
        return list(self._events)

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly as this one would: step
        counter, policy state, detector statistics, rate limiter, current window.
        Plain JSON values."""
        w = self._window
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "policy": None if self.policy is None else self.policy.state_dict(),
            "detectors": {getattr(d, "name", type(d).__name__): d.state_dict() for d in self._detectors},
            "alerts": self._limiter.state_dict(),
            "window": {
                "first": w.first, "steps": w.steps, "n_finite": w.n_finite, "total": w.total,
                "lo": w.lo if w.n_finite else None, "hi": w.hi if w.n_finite else None,
                "clipped": w.clipped, "skipped": w.skipped, "nonfinite": w.nonfinite,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (e.g. after ``json.loads``)."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"gradwatch state version {state.get('version')!r} is not supported (expected {STATE_VERSION}).",
                option="state",
                value=state.get("version"),
            )
        pol_state = state.get("policy")
        if (pol_state is None) != (self.policy is None):
            raise ConfigError(
                f"The saved gradwatch state was made with policy {None if pol_state is None else pol_state.get('policy')!r}"
                f" but this watch has policy {None if self.policy is None else self.policy.name!r}; pass the same "
                f"policy option when resuming.",
                option="policy",
                value=self.options.policy,
            )
        if self.policy is not None and pol_state is not None:
            self.policy.load_state_dict(pol_state)
        det_states = state.get("detectors", {})
        for d in self._detectors:
            key = getattr(d, "name", type(d).__name__)
            if key in det_states:
                d.load_state_dict(det_states[key])
        self._limiter.load_state_dict(state.get("alerts", {}))
        self._step = int(state["step"])
        ws = state.get("window") or {}
        w = self._window
        w.reset()
        w.first = int(ws.get("first", 0))
        w.steps = int(ws.get("steps", 0))
        w.n_finite = int(ws.get("n_finite", 0))
        w.total = float(ws.get("total", 0.0))
        w.lo = math.inf if ws.get("lo") is None else float(ws["lo"])
        w.hi = -math.inf if ws.get("hi") is None else float(ws["hi"])
        w.clipped = int(ws.get("clipped", 0))
        w.skipped = int(ws.get("skipped", 0))
        w.nonfinite = int(ws.get("nonfinite", 0))

    def summary(self) -> dict[str, Any]:
        """Steps recorded and the alerts still held back by rate limiting (kind, layer,
        count, first step): what a sink's ``write_summary`` receives at close."""
        held = []
        for key, n, first in self._limiter.pending():
            kind, _, layer = key.partition("|")
            held.append({"kind": kind, "layer": layer or None, "count": n, "first_step": first})
        return {"steps": self._step, "suppressed": held}

    def flush(self) -> None:
        """Write the current (partial) window to the sinks now."""
        self._flush()

    def close(self) -> None:
        """Flush the last partial window, report alerts still held back by rate
        limiting, and close the sinks. Idempotent."""
        if self._closed:
            return
        self._flush()
        if self._writes:
            summary = self.summary()
            for sink in list(self._sinks):
                if callable(getattr(sink, "write_summary", None)):
                    self._safe(sink, "write_summary", summary)
        for sink in list(self._sinks):
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                logger.error("[gradwatch] sink %s raised on close: %s", type(sink).__name__, exc)
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"Monitor(step={self._step}, policy={self.policy!r}, params={len(self._names)})"


def memory_sink(monitor: Monitor) -> MemorySink | None:
    """The first MemorySink of a monitor, if any (handy in tests and notebooks)."""
    return next((s for s in monitor.sinks if isinstance(s, MemorySink)), None)


def logging_sinks(monitor: Monitor) -> list[LoggingSink]:
    return [s for s in monitor.sinks if isinstance(s, LoggingSink)]
