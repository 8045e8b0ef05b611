"""Step records: what gradwatch measured at one optimizer step.

Records are frozen, slotted dataclasses of plain Python values (never tensors), so sinks,
plugins and the report need no framework. Mappings inside them are read-only. The
through-time records (:class:`TemporalProfile`, :class:`Propagation`) live in
:mod:`gradwatch.profiles` and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from gradwatch.profiles import Propagation, TemporalProfile, _profile_dict, _profile_from_dict, extreme

__all__ = [
    "ClipDecision",
    "GateStats",
    "NormMap",
    "Propagation",
    "StepRecord",
    "TemporalProfile",
    "WindowStats",
    "extreme",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class ClipDecision:
    """What a clipping policy decided at one step.

    ``threshold`` is the norm the gradient was limited to (for AGC: the clip factor, a
    ratio), ``scale`` the factor the whole gradient was multiplied by (for AGC, which
    scales unit by unit: the global norm after clipping over the norm before), always in
    [0, 1]. ``policy`` is the registry name of the policy ("fixed", "zclip", ...).
    """

    threshold: float
    scale: float
    policy: str

    @property
    def clipped(self) -> bool:
        """True when the gradient was actually made smaller."""
        return self.scale < 1.0


@dataclass(frozen=True, slots=True)
class GateStats:
    """Gate statistics of a gated recurrent layer (LSTM forget gate, GRU update gate).

    ``mean`` is the gate's mean activation over the probed sequences, their timesteps and
    the units. ``log_path_gain`` is the mean over units and sequences of sum_t log(gate_t),
    each sequence over its own length: the log of the factor by which the memory path (the
    LSTM's cell state, the GRU's carried state) scales a gradient over the whole sequence.
    Near 0 means the memory path is open; very negative means even the gated layer forgets
    within the sequence.

    Computed from the same replay as the propagation (see :class:`Propagation`): on the
    first ``min(batch, 8)`` sequences of the batch, from the initial state the user passed
    (zero when none), with each layer's real input, for every layer and direction of a
    stack. A module with several recurrences reports those of the one whose memory path
    closes most (lowest ``log_path_gain``), the one a vanishing alert is about. Under DDP,
    the mean over ranks. Present on the steps whose propagation was measured.
    """

    gate: str
    mean: float
    log_path_gain: float


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Statistics of the global norm over the steps since the previous flush.

    Flushed records carry these so a spike between two flushes is never lost.
    """

    first_step: int
    last_step: int
    steps: int
    norm_min: float
    norm_mean: float
    norm_max: float
    clipped: int = 0
    skipped: int = 0
    nonfinite: int = 0


class NormMap(Mapping[str, float]):
    """Read-only name -> norm mapping backed by one numpy vector.

    Built once per step without creating a dict: the names and their index are shared
    between steps, so measuring costs no Python work per parameter.
    """

    __slots__ = ("_index", "_values")

    def __init__(self, index: Mapping[str, int], values: np.ndarray) -> None:
        self._index = index
        self._values = values

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> NormMap:
        names = list(data)
        return cls({n: i for i, n in enumerate(names)}, np.array([float(data[n]) for n in names], dtype=np.float64))

    def __getitem__(self, key: str) -> float:
        return float(self._values[self._index[key]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"NormMap({dict(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The shared index is a read-only proxy, which pickle cannot copy: rebuild from values.
        return (NormMap.from_dict, (self.to_dict(),))

    @property
    def array(self) -> np.ndarray:
        """The values as a float64 vector, in the order of iteration (do not modify)."""
        return self._values

    def to_dict(self) -> dict[str, float]:
        vals = self._values.tolist()
        return {n: vals[i] for n, i in self._index.items()}


@dataclass(frozen=True, slots=True)
class StepRecord:
    """Everything gradwatch measured and decided at one optimizer step (see docs/API.md).

    Norms are L2 norms of the gradients *before* clipping. ``temporal``, ``spectral`` and
    ``gates`` are filled on profiled steps only (``profile_every``). ``window`` is set on
    records flushed to sinks and summarises the steps since the previous flush.
    """

    step: int
    global_norm: float
    param_norms: Mapping[str, float] = field(default_factory=_empty)
    layer_norms: Mapping[str, float] = field(default_factory=_empty)
    clip: ClipDecision | None = None
    skipped: bool = False
    nonfinite: tuple[str, ...] = ()
    temporal: Mapping[str, TemporalProfile] = field(default_factory=_empty)
    spectral: Mapping[str, float] = field(default_factory=_empty)
    gates: Mapping[str, GateStats] = field(default_factory=_empty)
    window: WindowStats | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Read-only mappings (MappingProxyType) do not pickle: go through the plain dict,
        # so records can cross process boundaries (multiprocessing, torch.save, DDP).
        return (StepRecord.from_dict, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (floats may be non-finite; the JSONL writer encodes those)."""
        return {
            "step": self.step,
            "global_norm": self.global_norm,
            "param_norms": _as_dict(self.param_norms),
            "layer_norms": _as_dict(self.layer_norms),
            "clip": None
            if self.clip is None
            else {"threshold": self.clip.threshold, "scale": self.clip.scale, "policy": self.clip.policy},
            "skipped": self.skipped,
            "nonfinite": list(self.nonfinite),
            "temporal": {k: _profile_dict(p) for k, p in self.temporal.items()},
            "spectral": dict(self.spectral),
            "gates": {
                k: {"gate": g.gate, "mean": g.mean, "log_path_gain": g.log_path_gain} for k, g in self.gates.items()
            },
            "window": None
            if self.window is None
            else {f: getattr(self.window, f) for f in WindowStats.__dataclass_fields__},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepRecord:
        """Inverse of :meth:`to_dict` (values already decoded to floats)."""
        clip = d.get("clip")
        window = d.get("window")
        return cls(
            step=int(d["step"]),
            global_norm=float(d["global_norm"]),
            param_norms=MappingProxyType({k: float(v) for k, v in (d.get("param_norms") or {}).items()}),
            layer_norms=MappingProxyType({k: float(v) for k, v in (d.get("layer_norms") or {}).items()}),
            clip=None
            if clip is None
            else ClipDecision(float(clip["threshold"]), float(clip["scale"]), str(clip["policy"])),
            skipped=bool(d.get("skipped", False)),
            nonfinite=tuple(d.get("nonfinite") or ()),
            temporal=MappingProxyType({k: _profile_from_dict(p) for k, p in (d.get("temporal") or {}).items()}),
            spectral=MappingProxyType({k: float(v) for k, v in (d.get("spectral") or {}).items()}),
            gates=MappingProxyType(
                {
                    k: GateStats(str(g["gate"]), float(g["mean"]), float(g["log_path_gain"]))
                    for k, g in (d.get("gates") or {}).items()
                }
            ),
            window=None if window is None else _window_from_dict(window),
        )

    def __repr__(self) -> str:  # one line, at most 300 characters (gradwatch.display.record_repr)
        from gradwatch.display import record_repr

        return record_repr(self)

    def _repr_html_(self) -> str:
        from gradwatch.display import record_html

        return record_html(self)


def _as_dict(m: Mapping[str, float]) -> dict[str, float]:
    return m.to_dict() if isinstance(m, NormMap) else dict(m)


def _window_from_dict(w: Mapping[str, Any]) -> WindowStats:
    return WindowStats(
        first_step=int(w["first_step"]),
        last_step=int(w["last_step"]),
        steps=int(w["steps"]),
        norm_min=float(w["norm_min"]),
        norm_mean=float(w["norm_mean"]),
        norm_max=float(w["norm_max"]),
        clipped=int(w.get("clipped", 0)),
        skipped=int(w.get("skipped", 0)),
        nonfinite=int(w.get("nonfinite", 0)),
    )
