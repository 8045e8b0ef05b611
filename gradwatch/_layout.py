"""The one statistics vector both backends pack on the device and the core unpacks.

A step's numbers leave the device in one copy: a flat float vector made of named
segments. A backend lists the segments it has this step (a :class:`Layout`), hands its
tensors to :meth:`Layout.pack` with its framework's ``concat``, copies the result to the
host once, and the core turns it into :class:`StepStats` with :meth:`Layout.unpack`.
No backend does offset arithmetic of its own.

Segment kinds (``size`` elements each):

=============  ==========================================================================
``step``       1: the device's own step counter (the backend orders ring-buffer rows by it)
``clip``       2: threshold and scale decided on the device
``skipped``    1: 1.0 when the device skipped the optimizer update
``profiled``   1: 1.0 on a profiled step; otherwise every per-layer segment is ignored
``norms``      n: L2 norm of each bound parameter's gradient (squared on the host, in
               float64, so a large float32 norm cannot overflow its square)
``sq_norms``   n: squared L2 norms
``nonfinite``  n: 1.0 where a parameter's gradient holds NaN or Inf
``clipped_sq`` n: squared norms after unit-wise clipping (AGC)
``temporal``   T (key: layer): per-timestep squared norms of dL/dx_t
``spectral``   G (key: weight; labels: one name per gate block): largest singular values
``gates``      2 (key: layer; labels: the gate's name): mean gate, mean sum_t log gate
``propagation`` R*T (key: layer; labels: the R recurrences): RMS gains (median over the
               probed sequences), T per recurrence
``max_gains``  R*T (key: layer; labels: the R recurrences): largest-singular-value gains
               (max over the probed sequences), T per recurrence
=============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from gradwatch.records import ClipDecision, GateStats

__all__ = ["KINDS", "Layout", "Segment", "StepStats"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

KINDS = (
    "step",
    "clip",
    "skipped",
    "profiled",
    "norms",
    "sq_norms",
    "nonfinite",
    "clipped_sq",
    "temporal",
    "spectral",
    "gates",
    "propagation",
    "max_gains",
)
_PER_LAYER = ("temporal", "spectral", "gates", "propagation", "max_gains")


@dataclass(frozen=True)
class StepStats:
    """What a backend measured at one step, on the host (what ``Monitor.process`` takes).

    Only ``sq_norms`` is required; every other field is what the backend has this step.
    """

    #: float64, the squared L2 norm of each bound parameter's gradient, before clipping.
    sq_norms: np.ndarray
    #: bool per parameter: the gradient holds NaN/Inf (None: derived from ``sq_norms``).
    nonfinite: np.ndarray | None = None
    #: layer -> per-timestep L2 norms of dL/dx_t (forward order).
    temporal: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    #: layer -> recurrence ("l0", "l0_reverse", ...) -> RMS gains over j = 0 .. T-1 steps back.
    propagation: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    #: layer -> recurrence -> largest-singular-value gains (rate and horizon are fitted on these).
    max_gains: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    #: "lstm.weight_hh_l0[f]" -> largest singular value.
    spectral: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    #: layer -> gate statistics.
    gates: Mapping[str, GateStats] = field(default_factory=lambda: _EMPTY)
    #: Unit-wise policies: squared norms after clipping, per parameter.
    clipped_sq_norms: np.ndarray | None = None
    #: A clipping decision taken on the device (None: the monitor decides on the host).
    decision: ClipDecision | None = None
    #: The device skipped the update (None: the monitor decides from ``on_nonfinite``).
    skipped: bool | None = None
    #: bool per bound parameter: it has a gradient this step (None: every one has).
    #: Absent parameters (frozen, or not reached by the loss) are left out of the record,
    #: the global norm and the checks; their ``sq_norms`` entry is ignored.
    present: np.ndarray | None = None


@dataclass(frozen=True)
class Segment:
    """One named piece of the statistics vector."""

    kind: str
    size: int
    key: str = ""
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown statistics segment kind {self.kind!r}; expected one of {KINDS}")
        if self.size < 0:
            raise ValueError(f"segment {self.kind}:{self.key} has negative size {self.size}")

    @property
    def id(self) -> tuple[str, str]:
        return (self.kind, self.key)


class Layout:
    """An ordered set of segments, with their offsets in the packed vector."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = tuple(segments)
        seen: set[tuple[str, str]] = set()
        offsets: dict[tuple[str, str], slice] = {}
        pos = 0
        for s in self.segments:
            if s.id in seen:
                raise ValueError(f"segment {s.kind}:{s.key} appears twice in a layout")
            seen.add(s.id)
            offsets[s.id] = slice(pos, pos + s.size)
            pos += s.size
        self.width = pos
        self._slices = offsets

    def __len__(self) -> int:
        return self.width

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.segments == self.segments

    def __hash__(self) -> int:
        return hash(self.segments)

    def slice(self, kind: str, key: str = "") -> slice | None:
        return self._slices.get((kind, key))

    def pack(self, parts: Mapping[tuple[str, str], Any], concat: Callable[[list[Any]], Any]) -> Any:
        """``concat`` of the parts in layout order; ``parts`` maps ``(kind, key)`` to a
        flat tensor of the segment's size. Missing or extra parts are a bug: ValueError."""
        missing = [s.id for s in self.segments if s.id not in parts]
        extra = [k for k in parts if k not in self._slices]
        if missing or extra:
            raise ValueError(f"Layout.pack: missing segments {missing}, unexpected {extra}")
        return concat([parts[s.id] for s in self.segments])

    def unpack(self, row: np.ndarray, policy_name: str | None = None) -> StepStats:
        """The host view of one packed row.

        ``policy_name`` labels a ``clip`` segment's decision. Per-layer segments are read
        only when the row is profiled (or has no ``profiled`` segment).
        """
        row = np.asarray(row, dtype=np.float64).reshape(-1)
        if row.shape[0] != self.width:
            raise ValueError(f"Layout.unpack: row of {row.shape[0]} values for a layout of width {self.width}")

        def get(kind: str, key: str = "") -> np.ndarray | None:
            sl = self._slices.get((kind, key))
            return None if sl is None else row[sl]

        sq = get("sq_norms")
        if sq is None:
            n = get("norms")
            sq = np.zeros(0) if n is None else np.square(n)
        nonfinite = get("nonfinite")
        clip = get("clip")
        skipped = get("skipped")
        flag = get("profiled")
        profiled = flag is None or bool(flag[0] > 0.5)
        temporal: dict[str, np.ndarray] = {}
        spectral: dict[str, float] = {}
        gates: dict[str, GateStats] = {}
        propagation: dict[str, dict[str, np.ndarray]] = {}
        max_gains: dict[str, dict[str, np.ndarray]] = {}
        if profiled:
            for s in self.segments:
                if s.kind not in _PER_LAYER:
                    continue
                v = row[self._slices[s.id]]
                if s.kind == "temporal":
                    temporal[s.key] = np.sqrt(np.maximum(v, 0.0))
                elif s.kind == "spectral":
                    spectral.update(zip(s.labels, (float(x) for x in v)))
                elif s.kind == "gates":
                    gates[s.key] = GateStats(s.labels[0] if s.labels else "", float(v[0]), float(v[1]))
                elif s.kind in ("propagation", "max_gains") and s.labels:
                    per = v.reshape(len(s.labels), -1)
                    target = propagation if s.kind == "propagation" else max_gains
                    target[s.key] = {label: per[i] for i, label in enumerate(s.labels)}
        clipped = get("clipped_sq")
        return StepStats(
            sq_norms=sq,
            nonfinite=None if nonfinite is None else nonfinite > 0.5,
            temporal=temporal,
            propagation=propagation,
            max_gains=max_gains,
            spectral=spectral,
            gates=gates,
            clipped_sq_norms=None if clipped is None else clipped.copy(),
            decision=None if clip is None else ClipDecision(float(clip[0]), float(clip[1]), policy_name or ""),
            skipped=None if skipped is None else bool(skipped[0] > 0.5),
        )
