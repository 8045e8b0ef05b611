"""Where records and events go once the pipeline has made them.

Events are rate-limited (one per ``alert_every`` steps for each kind and layer, repeats
counted, never silently lost), then written to every sink at once and announced to
plugins. Records are summarised over a window and flushed every ``log_every`` steps, so
a spike between two flushes is never lost. A sink or plugin that raises is disabled after
one ERROR line: nothing reaches the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gradwatch.errors import ConfigError
from gradwatch.events import GradEvent
from gradwatch.records import GateStats, StepRecord, TemporalProfile, WindowStats

if TYPE_CHECKING:
    from gradwatch.plugins import IsolatedCaller
    from gradwatch.sinks import Sink
    from gradwatch.view import MonitorView

__all__ = ["Dispatcher", "RateLimiter", "Window", "WindowProfiles"]

logger = logging.getLogger("gradwatch")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _latest_of_each(held: Mapping[str, TemporalProfile], new: Mapping[str, TemporalProfile]) -> Mapping[str, TemporalProfile]:
    """The window's profiles after a step that profiled: each layer's newest sensitivity,
    and its newest propagation even when this step measured only the sensitivity (the
    backends measure propagation on fewer steps than the profile: a flushed record must
    not lose one to a later, cheaper profile of the same window)."""
    if not held:
        return new
    out = {**held, **new}
    for layer, prof in new.items():
        old = held.get(layer)
        if old is not None and old.recurrences and not prof.recurrences:
            out[layer] = dataclasses.replace(prof, gain=old.gain, horizon=old.horizon, propagation=old.propagation, recurrences=old.recurrences)
    return MappingProxyType(out)


class WindowProfiles(Mapping[str, TemporalProfile]):
    """The ``temporal`` of a flushed record: each layer's latest profile of the window,
    and ``measured_at[layer]``, the step whose forward and backward its propagation was
    measured on.

    A flushed record carries the step of its flush, and the window's latest propagation
    may come from up to ``log_every - 1`` steps earlier (a profiled step, then cheaper
    steps): consumers say where it was measured (the INFO line "(measured at step N)",
    TensorBoard writes it at step N) instead of presenting it as the flush step's. A
    read-only mapping like any record's; pickled records and run files keep the profiles
    only.
    """

    __slots__ = ("_profiles", "measured_at")

    def __init__(self, profiles: Mapping[str, TemporalProfile], measured_at: Mapping[str, int]) -> None:
        self._profiles = profiles
        self.measured_at: Mapping[str, int] = MappingProxyType(dict(measured_at))

    def __getitem__(self, key: str) -> TemporalProfile:
        return self._profiles[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._profiles)

    def __len__(self) -> int:
        return len(self._profiles)

    def __repr__(self) -> str:
        return f"WindowProfiles({dict(self._profiles)!r}, measured_at={dict(self.measured_at)!r})"


class Window:
    """The statistics of the steps between two flushes."""

    __slots__ = (
        "clipped", "first", "gates", "hi", "last", "lo", "measured_at", "n_finite", "nonfinite", "skipped", "spectral",
        "steps", "temporal", "total",
    )

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
        self.measured_at: dict[str, int] = {}
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
            self.lo = min(self.lo, g)
            self.hi = max(self.hi, g)
        self.clipped += r.clip is not None and r.clip.scale < 1.0
        self.skipped += r.skipped
        self.nonfinite += bool(r.nonfinite)
        if r.temporal:
            self.temporal = _latest_of_each(self.temporal, r.temporal)
            for layer, prof in r.temporal.items():
                if prof.recurrences:
                    self.measured_at[layer] = r.step
        if r.spectral:
            self.spectral = r.spectral
        if r.gates:
            self.gates = r.gates
        self.last = r

    def summary(self) -> StepRecord | None:
        """The last record of the window, carrying the window's statistics and the latest
        profiles seen in it."""
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
        temporal = WindowProfiles(self.temporal, self.measured_at) if self.measured_at else self.temporal
        return dataclasses.replace(
            r, window=stats, temporal=temporal, spectral=r.spectral or self.spectral, gates=r.gates or self.gates
        )

    _SAVED = ("first", "steps", "n_finite", "total", "clipped", "skipped", "nonfinite")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self._SAVED}
        out["lo"] = self.lo if self.n_finite else None
        out["hi"] = self.hi if self.n_finite else None
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        for k in self._SAVED:
            setattr(self, k, type(getattr(self, k))(state.get(k, 0)))
        self.lo = math.inf if state.get("lo") is None else float(state["lo"])
        self.hi = -math.inf if state.get("hi") is None else float(state["hi"])


class RateLimiter:
    """At most one alert per ``every`` steps for each (kind, layer); repeats are counted
    and reported with the next alert that gets through, or at close.

    A condition that gets markedly worse is alerted again at once, limit or not: an event
    whose ``worse_when`` says which way its ``value`` worsens passes when, against the
    last event admitted for its (kind, layer), the value is at least ``WORSE_FACTOR``
    times higher ("higher": a norm, a gain), or at most half and at least ``WORSE_STEPS``
    lower ("lower": a horizon, 12 -> 4 passes, 12 -> 8 does not). Its message then says
    so ("worse than at step 40: horizon 12 → 4").
    """

    #: "higher": at least this many times the last admitted value.
    WORSE_FACTOR = 10.0
    #: "lower": at most this fraction of the last admitted value ...
    WORSE_FRACTION = 0.5
    #: ... and at least this much below it (a horizon of 3 -> 1 is not "markedly" worse).
    WORSE_STEPS = 2.0

    def __init__(self, every: int) -> None:
        self.every = every
        # key -> [last emitted step, suppressed count, first suppressed step]
        self.state: dict[str, list[int]] = {}
        # key -> value of the last admitted event that said which way it worsens
        self.values: dict[str, float] = {}

    def _worse(self, event: GradEvent, key: str) -> float | None:
        """The last admitted value when ``event`` is markedly worse than it, else None."""
        way, v = event.worse_when, event.value
        last = self.values.get(key)
        if way is None or v is None or last is None or not math.isfinite(v):
            return None
        if way == "higher" and last > 0 and v >= self.WORSE_FACTOR * last:
            return last
        if way == "lower" and v <= self.WORSE_FRACTION * last and v <= last - self.WORSE_STEPS:
            return last
        return None

    def admit(self, event: GradEvent) -> GradEvent | None:
        if self.every == 0:
            return event
        key = f"{event.kind}|{event.layer or ''}"
        ent = self.state.get(key)
        worse = None if ent is None or event.step - ent[0] >= self.every else self._worse(event, key)
        if ent is None or event.step - ent[0] >= self.every or worse is not None:
            changes: dict[str, Any] = {}
            if worse is not None:
                assert ent is not None and event.value is not None
                what = "horizon " if event.worse_when == "lower" else ""
                change = f"{what}{_num(worse)} → {_num(event.value)}"
                changes["message"] = f"{event.message} (Worse than at step {ent[0]}: {change}.)"
            if ent is not None and ent[1]:
                n = ent[1]
                changes["suppressed"] = n
                held = f"{n} similar alert{'s' if n > 1 else ''} suppressed since step {ent[2]}"
                changes["message"] = f"{changes.get('message', event.message)} ({held}.)"
            if changes:
                event = dataclasses.replace(event, **changes)
            self.state[key] = [event.step, 0, 0]
            if event.worse_when is not None and event.value is not None and math.isfinite(event.value):
                self.values[key] = float(event.value)
            else:
                self.values.pop(key, None)
            return event
        if ent[1] == 0:
            ent[2] = event.step
        ent[1] += 1
        return None

    def pending(self) -> list[dict[str, Any]]:
        """Alerts held back and not yet reported: kind, layer, count, first step."""
        held = []
        for key, (_, n, first) in self.state.items():
            if n:
                kind, _, layer = key.partition("|")
                held.append({"kind": kind, "layer": layer or None, "count": n, "first_step": first})
        return held

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: list(v) for k, v in self.state.items()}
        if self.values:
            # Not a "kind|layer" key (no "|"), so states saved before it read back as before.
            out["worse_values"] = dict(self.values)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = {k: [int(x) for x in v] for k, v in state.items() if k != "worse_values"}
        self.values = {str(k): float(v) for k, v in (state.get("worse_values") or {}).items()}


def _num(x: float) -> str:
    """A horizon as an integer, anything else with 3 significant digits."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{x:.3g}"


class Dispatcher:
    """Sinks, windows, rate limits and plugin announcements of one run.

    Only a writing rank (rank 0, or every rank with ``all_ranks=True``) touches the sinks;
    every rank announces to plugins.
    """

    def __init__(self, sinks: Sequence[Sink], hooks: IsolatedCaller, view: MonitorView, *, log_every: int, alert_every: int) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.hooks = hooks
        self.view = view
        self.log_every = log_every
        self.window = Window()
        self.limiter = RateLimiter(alert_every)
        self.writes = True
        #: Sinks that take every step (``write_step``: the run file's per-step norms).
        self.taps: list[Sink] = [s for s in self.sinks if callable(getattr(s, "write_step", None))]

    def event(self, event: GradEvent) -> GradEvent | None:
        """Rate-limit ``event``; if it passes, write it and announce it. Returns it then."""
        admitted = self.limiter.admit(event)
        if admitted is None:
            return None
        if self.writes:
            for sink in list(self.sinks):
                self._safe(sink, "write_event", admitted)
        self.hooks.call("gradwatch_event", event=admitted, view=self.view)
        return admitted

    def record(self, record: StepRecord) -> None:
        """Add a step's record to the window, flush every ``log_every`` steps, announce it."""
        self.window.add(record)
        if self.taps and self.writes:
            for sink in list(self.taps):
                self._safe(sink, "write_step", record)
        if record.step % self.log_every == 0:
            self.flush()
        self.hooks.call("gradwatch_step_recorded", record=record, view=self.view)

    def flush(self) -> None:
        """Write the current (partial) window to the sinks now."""
        summary = self.window.summary()
        self.window.reset()
        if summary is None or not self.writes:
            return
        for sink in list(self.sinks):
            self._safe(sink, "write_record", summary)

    def close(self, summary: dict[str, Any]) -> None:
        """Flush the last window, hand ``summary`` to the sinks that take one, close them."""
        self.flush()
        if self.writes:
            for sink in list(self.sinks):
                if callable(getattr(sink, "write_summary", None)):
                    self._safe(sink, "write_summary", summary)
        for sink in list(self.sinks):
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - closing must go on with the other sinks
                logger.error("sink %s raised on close: %s", type(sink).__name__, exc)

    def _safe(self, sink: Sink, method: str, arg: Any) -> None:
        try:
            getattr(sink, method)(arg)
        except Exception as exc:  # noqa: BLE001 - a sink must never reach the training loop
            self._disable(sink, exc)

    def _disable(self, sink: Sink, exc: Exception) -> None:
        """Take a sink that raised out of the run, after one ERROR line."""
        if sink in self.sinks:
            self.sinks.remove(sink)
        if sink in self.taps:
            self.taps.remove(sink)
        logger.error(
            "sink %s raised %s: %s; it is disabled for the rest of this run. Training goes on.",
            type(sink).__name__,
            type(exc).__name__,
            exc,
        )
        try:
            sink.close()
        except Exception:  # noqa: BLE001, S110 - already reported above
            pass

    def resume(self, step: int) -> None:
        """Tell the sinks that continue what they wrote (``resume(step)``: the run file
        appends) that the run resumes from a checkpoint taken at ``step``. A
        ``ConfigError`` (a path that holds something other than a run file) reaches the
        caller, before training goes on; any other failure disables that sink only."""
        if not self.writes:
            return
        for sink in list(self.sinks):
            resume = getattr(sink, "resume", None)
            if not callable(resume):
                continue
            try:
                resume(step)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a sink must never reach the training loop
                self._disable(sink, exc)

    def state_dict(self) -> dict[str, Any]:
        return {"alerts": self.limiter.state_dict(), "window": self.window.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.limiter.load_state_dict(state.get("alerts") or {})
        self.window.load_state_dict(state.get("window") or {})
