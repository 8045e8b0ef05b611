"""Detectors: every source of events (vanishing, exploding, non-finite, clipped, skipped).

A detector sees each record once, right after it is built, together with a read-only
:class:`~gradwatch.view.MonitorView`, and returns the events it finds; the monitor
rate-limits and emits them. Every threshold is an option (see
:class:`gradwatch.options.Options`). Detectors keep their statistics in plain floats so
``state_dict()`` round-trips through JSON and a resumed run alerts exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from gradwatch.events import GradEvent
from gradwatch.formatting import clip_hint, fmt, nonfinite_message
from gradwatch.options import Options
from gradwatch.records import NormMap, StepRecord
from gradwatch.through_time.judge import Stateless as _Stateless
from gradwatch.through_time.judge import TemporalDetector

if TYPE_CHECKING:
    from gradwatch.view import MonitorView

logger = logging.getLogger("gradwatch")

__all__ = [
    "BUILTIN_DETECTORS",
    "ClipDetector",
    "Detector",
    "NonFiniteDetector",
    "SkipDetector",
    "SpikeDetector",
    "TemporalDetector",
    "VanishingNormDetector",
]


@runtime_checkable
class Detector(Protocol):
    """What a detector implements. Plugins register classes of this shape through
    ``gradwatch_register_detectors``; each is built with the run's :class:`Options`."""

    name: ClassVar[str]

    def __init__(self, options: Options) -> None: ...

    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...



class NonFiniteDetector(_Stateless):
    """Any NaN or Inf in any gradient: one ERROR event naming the parameters."""

    name: ClassVar[str] = "nonfinite"

    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]:
        if not record.nonfinite:
            return ()
        first = record.nonfinite[0]
        layer = view.layer_of(first)
        return (
            GradEvent(
                kind="nonfinite",
                step=record.step,
                severity=logging.ERROR,
                message=nonfinite_message(record.step, record.nonfinite, layer, self.options.on_nonfinite),
                layer=layer,
                param=first,
                value=record.param_norms.get(first, math.nan),
                threshold=None,
            ),
        )


class SpikeDetector:
    """Exploding global norm: a spike far above the norm's own running statistics, or a
    jump of orders of magnitude over every previous step.

    Works on log(norm), whose spread is about constant over training even while the norm
    itself drifts by orders of magnitude. After ``spike_warmup`` steps, a norm is a spike
    when both z = (log norm - mean) / std > ``spike_z`` and norm > ``spike_ratio`` x
    exp(mean): the z-score alone fires on tiny wobbles when the norm is very steady, the
    ratio alone misses spikes on noisy runs. Statistics are exponentially weighted
    (``spike_alpha``); a spike enters them capped at mean + spike_z * std, so one
    explosion does not blind the detector to the next.

    No warm-up hides a jump: from the second step on, a norm above ``jump_ratio`` x the
    largest norm of the previous steps is exploding (norms 0.188, 1.28, then 8.31e16 at
    step 3). A healthy start ramps up by tens, not by ten thousands. Such a norm enters
    neither the statistics nor that largest norm. ``norm_ceiling`` adds an absolute
    limit, checked from the first step.

    A change in the set of parameters that have a gradient (a frozen backbone unfrozen, a
    new head) changes the global norm without anything exploding: the statistics then
    restart their warm-up for the new set (one INFO line says so), and the step of the
    change is judged for a jump on the parameters present in both steps only, against
    their norm at the previous step.
    """

    name: ClassVar[str] = "spike"
    #: INFO lines about a changed parameter set, at most (a set that changes every step
    #: would otherwise fill the log; the statistics restart each time all the same).
    _MAX_SET_NOTES: ClassVar[int] = 5

    def __init__(self, options: Options) -> None:
        self.options = options
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.top = 0.0  # the largest norm of the previous steps (jumps excluded); 0: none yet
        self.set_digest: str | None = None  # which parameters the statistics describe
        self.set_notes = 0
        self._index: object = None  # the previous record's param_norms index (fast path)
        self._prev: Mapping[str, float] | None = None  # the previous record's param_norms
        self._shared_prev = 0.0  # at a change of set: the previous step's norm over the shared parameters

    # ------------------------------------------------------------------ parameter set
    def _set_changed(self, record: StepRecord) -> bool:
        """Whether the parameters with a gradient differ from the previous step's.

        A record's ``param_norms`` leaves absent parameters out. Steady state costs one
        identity test: the monitor shares one name index between steps of one presence
        pattern."""
        pn = record.param_norms
        index = getattr(pn, "_index", None)
        if index is not None and index is self._index:
            return False
        self._index = index
        digest = _names_digest(pn)
        if self.set_digest is None:  # the first step, or a state from before sets were kept
            self.set_digest = digest
            return False
        if digest == self.set_digest:
            return False
        self.set_digest = digest
        return True

    def _rebase(self, record: StepRecord, prev: Mapping[str, float] | None) -> float | None:
        """Restart the statistics for a new parameter set; the norm of this step over the
        parameters present in both steps, to judge this step on (None: none shared)."""
        pn = record.param_norms
        shared = [k for k in pn if prev is not None and k in prev]
        joined = len(pn) - len(shared)
        left = (len(prev) if prev is not None else 0) - len(shared)
        if self.set_notes < self._MAX_SET_NOTES:
            self.set_notes += 1
            more = " (further changes of the set are not reported)" if self.set_notes == self._MAX_SET_NOTES else ""
            logger.info(
                "step %d: the parameters with a gradient changed (%d joined, %d left); the global norm's "
                "spike statistics restart their %d-step warm-up for the new set%s.",
                record.step, joined, left, self.options.spike_warmup, more,
            )
        self.n = 0
        self.mean = self.var = 0.0
        self.top = 0.0
        if not shared or prev is None:
            return None
        self._shared_prev = math.sqrt(math.fsum(prev[k] ** 2 for k in shared))
        return math.sqrt(math.fsum(pn[k] ** 2 for k in shared))

    # ------------------------------------------------------------------ check
    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]:
        norm = record.global_norm
        prev = self._prev
        self._prev = record.param_norms
        changed = self._set_changed(record)
        shared = self._rebase(record, prev) if changed else None
        if not (math.isfinite(norm) and norm > 0):
            return ()
        o = self.options
        events: list[GradEvent] = []
        if o.norm_ceiling is not None and norm > o.norm_ceiling:
            events.append(
                GradEvent(
                    kind="exploding",
                    step=record.step,
                    severity=logging.WARNING,
                    message=(
                        f"Gradient norm {fmt(norm)} at step {record.step} is above the ceiling "
                        f"norm_ceiling={fmt(o.norm_ceiling)}. {clip_hint(record)}"
                    ),
                    value=norm,
                    threshold=o.norm_ceiling,
                    worse_when="higher",
                )
            )
        if changed:
            if shared is not None and self._shared_prev > 0 and shared > o.jump_ratio * self._shared_prev:
                over = " over the parameters present in both steps"
                events.append(self._jump(record, shared, self._shared_prev, over))
                return events
            self._enter(math.log(norm))
            self.top = norm
            return events
        if self.top > 0 and norm > o.jump_ratio * self.top:
            events.append(self._jump(record, norm, self.top, ""))
            return events  # enters nothing: the next steps are judged against the healthy ones
        self.top = max(self.top, norm)
        x = math.log(norm)
        if self.n < o.spike_warmup:
            self._enter(x)
            return events
        std = math.sqrt(max(self.var, 0.0))
        z = (x - self.mean) / (std + 1e-12)
        ref = math.exp(self.mean)
        if z > o.spike_z and norm > o.spike_ratio * ref:
            events.append(
                GradEvent(
                    kind="exploding",
                    step=record.step,
                    severity=logging.WARNING,
                    message=(
                        f"Gradient norm spiked at step {record.step}: {fmt(norm)} is {norm / ref:.0f}x its "
                        f"running level {fmt(ref)} (log-space z-score {z:.1f}; alerts above z {fmt(o.spike_z)} "
                        f"and {fmt(o.spike_ratio)}x). {clip_hint(record)}"
                    ),
                    value=norm,
                    threshold=o.spike_ratio * ref,
                    worse_when="higher",
                )
            )
            x = self.mean + o.spike_z * std
        a = o.spike_alpha
        d = x - self.mean
        incr = (1.0 - a) * d
        self.mean += incr
        self.var = a * (self.var + d * incr)
        return events

    def _enter(self, x: float) -> None:
        """Welford's running mean and variance over the warm-up steps."""
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.var += (d * (x - self.mean) - self.var) / self.n

    def _jump(self, record: StepRecord, norm: float, top: float, over: str) -> GradEvent:
        o = self.options
        return GradEvent(
            kind="exploding",
            step=record.step,
            severity=logging.WARNING,
            message=(
                f"Gradient norm jumped at step {record.step}: {fmt(norm)}{over} is {fmt(norm / top)}x the largest "
                f"norm of the previous steps ({fmt(top)}; alerts above jump_ratio={fmt(o.jump_ratio)}x, at any "
                f"step). {clip_hint(record)}"
            ),
            value=record.global_norm,
            threshold=o.jump_ratio * top,
            worse_when="higher",
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.mean,
            "var": self.var,
            "top": self.top,
            "set": self.set_digest,
            "set_notes": self.set_notes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = int(state["n"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        # States saved before jumps and parameter sets were kept: no largest norm yet, and
        # the first set seen after resuming is taken as the statistics' own.
        self.top = float(state.get("top", 0.0))
        digest = state.get("set")
        self.set_digest = digest if isinstance(digest, str) else None
        self.set_notes = int(state.get("set_notes", 0))
        self._index = None
        self._prev = None


def _names_digest(names: Mapping[str, float]) -> str:
    """A short fingerprint of a set of parameter names (order does not matter), so the
    state stays small for models of any size."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(names):
        h.update(name.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


class VanishingNormDetector:
    """The global norm, or one layer's norm, stayed below ``vanish_floor`` for
    ``vanish_patience`` consecutive steps: that part of the model has stopped learning.

    Counts are kept in one numpy vector over every layer seen so far, so a step costs no
    Python loop. A layer absent from a record (frozen, or no gradient this step) is not
    counted: its count neither grows nor resets, so a frozen layer never alerts, and a
    layer that joins later (a new head, an unfrozen backbone) starts from zero.
    """

    name: ClassVar[str] = "vanishing_norm"

    def __init__(self, options: Options) -> None:
        self.options = options
        self.global_count = 0
        self.layers: tuple[str, ...] = ()
        self.counts = np.zeros(0, dtype=np.int64)
        self._seen: tuple[str, ...] | None = None  # the layer names of the previous record
        self._pos = np.zeros(0, dtype=np.intp)  # their positions in self.layers

    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]:
        o = self.options
        if o.vanish_floor <= 0:
            return ()
        events: list[GradEvent] = []
        g = record.global_norm
        self.global_count = self.global_count + 1 if (math.isfinite(g) and g < o.vanish_floor) else 0
        if self.global_count >= o.vanish_patience:
            events.append(
                GradEvent(
                    kind="vanishing",
                    step=record.step,
                    severity=logging.WARNING,
                    message=(
                        f"The global gradient norm has stayed below {fmt(o.vanish_floor)} for "
                        f"{self.global_count} steps (now {fmt(g)} at step {record.step}): the model has "
                        f"stopped learning. Check for saturated activations, a detached graph, or a "
                        f"learning-rate schedule that reached zero."
                    ),
                    value=g,
                    threshold=o.vanish_floor,
                )
            )
        ln = record.layer_norms
        if isinstance(ln, NormMap):
            names = tuple(ln)
            vals = ln.array
        else:
            names = tuple(ln)
            vals = np.fromiter((ln[n] for n in names), dtype=np.float64, count=len(names))
        if names != self._seen:
            known = {n: i for i, n in enumerate(self.layers)}
            new = [n for n in names if n not in known]
            if new:
                self.layers = self.layers + tuple(new)
                self.counts = np.concatenate([self.counts, np.zeros(len(new), dtype=np.int64)])
                known.update((n, len(known)) for n in new)
            self._seen = names
            self._pos = np.fromiter((known[n] for n in names), dtype=np.intp, count=len(names))
        low = np.isfinite(vals) & (vals < o.vanish_floor)
        counts = np.where(low, self.counts[self._pos] + 1, 0)
        self.counts[self._pos] = counts
        if len(names) > 1 and counts.max(initial=0) >= o.vanish_patience:
            for i in np.flatnonzero(counts >= o.vanish_patience):
                layer = names[int(i)]
                events.append(
                    GradEvent(
                        kind="vanishing",
                        step=record.step,
                        severity=logging.WARNING,
                        message=(
                            f"The gradient of layer {layer!r} has stayed below {fmt(o.vanish_floor)} for "
                            f"{int(counts[i])} steps (now {fmt(float(vals[i]))} at step {record.step}): "
                            f"this layer has stopped learning. Check for dead ReLUs, saturated gates, or a "
                            f"branch the loss does not reach."
                        ),
                        layer=layer,
                        value=float(vals[i]),
                        threshold=o.vanish_floor,
                    )
                )
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"global_count": self.global_count, "layers": list(self.layers), "counts": self.counts.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_count = int(state["global_count"])
        self.layers = tuple(state["layers"])
        self.counts = np.asarray(state["counts"], dtype=np.int64).reshape(-1).copy()
        self._seen = None


class ClipDetector(_Stateless):
    """An INFO event for every step the policy scaled down (counted, rate-limited)."""

    name: ClassVar[str] = "clipped"

    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]:
        clip = record.clip
        if clip is None or clip.scale >= 1.0:
            return ()
        return (
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
            ),
        )


class SkipDetector(_Stateless):
    """A WARNING event for every optimizer step gradwatch skipped (``on_nonfinite="skip"``)."""

    name: ClassVar[str] = "skipped"

    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]:
        if not record.skipped:
            return ()
        first = record.nonfinite[0] if record.nonfinite else None
        return (
            GradEvent(
                kind="skipped",
                step=record.step,
                severity=logging.WARNING,
                message=(
                    f"Step {record.step} skipped"
                    + (f" because of a non-finite gradient in {first!r}" if first else "")
                    + ": weights and optimizer state are unchanged."
                ),
                layer=view.layer_of(first) if first else None,
                param=first,
                value=record.global_norm,
            ),
        )


BUILTIN_DETECTORS: tuple[type, ...] = (
    NonFiniteDetector,
    SpikeDetector,
    TemporalDetector,
    VanishingNormDetector,
    ClipDetector,
    SkipDetector,
)
