"""Step records: what gradwatch measured at one optimizer step.

Records are frozen, slotted dataclasses of plain Python values (never tensors), so sinks,
plugins and the report need no framework. Mappings inside them are read-only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from gradwatch.through_time import fit as _fit

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
class Propagation:
    """How one recurrence of a layer carries a gradient back through its own state.

    Index j = steps back from the last processed step, j = 0 .. T-1, on this step's forward
    trajectory, in processing order (for a reversed direction j counts back along the
    reversed sequence); s is h (RNN, GRU), (h, c) (LSTM, h projected with ``proj_size``),
    or the whole state of a diagonal recurrence (minGRU, Mamba); padded / masked steps are
    the identity. Over the probed sequences (the first ``min(batch, 8)``; under DDP,
    every rank's):

    * ``max_gains[j]``: the largest singular value ||ds_T/ds_{T-j}||_2, the **max** over
      the sequences (the quantity of Pascanu et al.'s bounds);
    * ``gains[j]``: the RMS gain ||ds_T/ds_{T-j}||_F / sqrt(dim s) (a typical direction),
      the **median** over the sequences;
    * ``rate``: exp of the slope of the least-squares line through (j, log max_gains[j])
      (< 1 vanishing, > 1 exploding); ``horizon``: steps back until ``max_gains`` falls
      below ``vanish_ratio`` (T if it never does).

    ``max_gains[0] == gains[0] == 1``. Exact when dim s <= 16 and for diagonal recurrences;
    above, estimated (the backend's docstring states how, and its measured error). Run
    files written before max gains existed read back with ``max_gains == ()``; their rate
    and horizon were fitted on ``gains``.
    """

    gains: tuple[float, ...]
    rate: float
    horizon: int
    max_gains: tuple[float, ...] = ()

    @classmethod
    def from_gains(
        cls,
        gains: Sequence[float] | np.ndarray,
        vanish_ratio: float = _fit.HORIZON_FRACTION,
        max_gains: Sequence[float] | np.ndarray | None = None,
    ) -> Propagation:
        """Fit ``rate`` and ``horizon`` with the core's maths: on ``max_gains`` when given
        (the contract), else on ``gains``."""
        arr = tuple(np.asarray(gains, dtype=np.float64).reshape(-1).tolist())
        top = () if max_gains is None else tuple(np.asarray(max_gains, dtype=np.float64).reshape(-1).tolist())
        basis = top if top else arr
        return cls(arr, _fit.rate(basis), _fit.horizon(basis, vanish_ratio), top)

    @property
    def length(self) -> int:
        return len(self.gains)

    @property
    def peak(self) -> float:
        """The largest gain over any number of steps back (of ``max_gains`` when measured;
        NaN ignored)."""
        basis = self.max_gains or self.gains
        finite = [g for g in basis if not math.isnan(g)]
        return max(finite) if finite else math.nan

    @property
    def peak_step(self) -> int:
        """The j at which :attr:`peak` is reached."""
        basis = self.max_gains or self.gains
        return max(range(len(basis)), key=lambda i: -math.inf if math.isnan(basis[i]) else basis[i]) if basis else 0


def extreme(recurrences: Mapping[str, Propagation]) -> tuple[str, Propagation] | None:
    """The recurrence whose rate is farthest from 1 in log (NaN rates count least)."""
    best: tuple[str, Propagation] | None = None
    best_d = -1.0
    for name, p in recurrences.items():
        r = p.rate
        d = abs(math.log(r)) if math.isfinite(r) and r > 0 else (math.inf if r in (0.0, math.inf) else -0.5)
        if best is None or d > best_d:
            best, best_d = (name, p), d
    return best


@dataclass(frozen=True, slots=True)
class TemporalProfile:
    """What gradwatch measured along the time axis of one recurrent layer.

    Two different questions, both answered:

    * *Sensitivity*, ``norms[t]``: the L2 norm of dL/dx_t over batch and features, x being
      the layer's input sequence, for each timestep t in forward order. It says which
      timesteps the loss draws its gradient from; a trained model that uses only x_1 has
      its largest norm at t=1, and that is healthy.
    * *Propagation*, ``recurrences``: one :class:`Propagation` per (layer, direction),
      keyed ``"l0"``, ``"l1"``, ``"l0_reverse"``, ...: how the recurrence itself carries
      a gradient back through its state. Vanishing and exploding gradients (Pascanu et al.
      2013) are properties of this Jacobian product, and gradwatch alerts on it only.

    ``propagation``, ``gain`` (the fitted per-step rate) and ``horizon`` are those of the
    most extreme recurrence (the one whose rate is farthest from 1 in log). A profile without
    a propagation measurement has ``recurrences == {}``, ``propagation == ()``, ``gain``
    NaN and ``horizon is None`` (never 0: 0 would read as "the gradient dies at once").
    Clearer names beside them: :attr:`sensitivity` (= ``norms``), :attr:`rate` (= ``gain``),
    :attr:`gains` (= ``propagation``), :attr:`max_gains`.
    """

    norms: tuple[float, ...]
    gain: float
    horizon: int | None
    #: Gains of the most extreme recurrence (see :class:`Propagation`); () when not measured.
    propagation: tuple[float, ...] = ()
    #: One :class:`Propagation` per (layer, direction): "l0", "l1", "l0_reverse", ...
    recurrences: Mapping[str, Propagation] = field(default_factory=_empty)

    @classmethod
    def build(
        cls,
        norms: Sequence[float] | np.ndarray = (),
        recurrences: Mapping[str, Any] | None = None,
        vanish_ratio: float = _fit.HORIZON_FRACTION,
        max_gains: Mapping[str, Any] | None = None,
    ) -> TemporalProfile:
        """A profile from input-gradient norms and per-recurrence gains (arrays or
        :class:`Propagation`\\ s; ``max_gains`` the largest singular values per recurrence,
        on which rate and horizon are fitted); either may be empty."""
        tops = max_gains or {}
        recs = {
            k: v if isinstance(v, Propagation) else Propagation.from_gains(v, vanish_ratio, tops.get(k))
            for k, v in (recurrences or {}).items()
        }
        worst = extreme(recs)
        p = worst[1] if worst is not None else None
        return cls(
            norms=tuple(float(v) for v in np.asarray(norms, dtype=np.float64).reshape(-1)),
            gain=p.rate if p is not None else math.nan,
            horizon=p.horizon if p is not None else None,
            propagation=p.gains if p is not None else (),
            recurrences=MappingProxyType(recs),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_profile_from_dict, (_profile_dict(self),))

    @property
    def sensitivity(self) -> tuple[float, ...]:
        """``norms``: ||dL/dx_t|| per timestep, forward order."""
        return self.norms

    @property
    def rate(self) -> float:
        """``gain``: the per-step factor of the most extreme recurrence (NaN: not measured)."""
        return self.gain

    @property
    def gains(self) -> tuple[float, ...]:
        """``propagation``: RMS gains of the most extreme recurrence (() : not measured)."""
        return self.propagation

    @property
    def max_gains(self) -> tuple[float, ...]:
        """Largest-singular-value gains of the most extreme recurrence (() : not measured)."""
        worst = extreme(self.recurrences)
        return worst[1].max_gains if worst is not None else ()

    @property
    def measured(self) -> bool:
        """Whether this profile carries a propagation measurement."""
        return bool(self.recurrences)

    @property
    def length(self) -> int:
        """Timesteps of the profile (of the propagation when measured, else of ``norms``)."""
        return len(self.propagation) if self.propagation else len(self.norms)

    @property
    def earliest_over_peak(self) -> float:
        """Sensitivity: norms[0] / max(norms), the share of the peak input gradient that
        x_1 gets (small is healthy when the loss does not need x_1)."""
        peak = max(self.norms) if self.norms else 0.0
        return self.norms[0] / peak if peak > 0 else math.nan


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


def _propagation_dict(r: Propagation) -> dict[str, Any]:
    out: dict[str, Any] = {"gains": list(r.gains), "rate": r.rate, "horizon": r.horizon}
    if r.max_gains:
        out["max_gains"] = list(r.max_gains)
    return out


def _profile_dict(p: TemporalProfile) -> dict[str, Any]:
    out: dict[str, Any] = {"norms": list(p.norms), "gain": p.gain, "horizon": p.horizon}
    if p.propagation:
        out["propagation"] = list(p.propagation)
    if p.recurrences:
        out["recurrences"] = {k: _propagation_dict(r) for k, r in p.recurrences.items()}
    return out


def _profile_from_dict(p: Mapping[str, Any]) -> TemporalProfile:
    recs = p.get("recurrences") or {}
    hor = p.get("horizon")
    return TemporalProfile(
        norms=tuple(float(x) for x in p["norms"]),
        gain=float(p["gain"]),
        # Files written before "not measured" was None said 0 for a profile without recurrences.
        horizon=None if hor is None or not recs else int(hor),
        propagation=tuple(float(x) for x in p.get("propagation") or ()),
        recurrences=MappingProxyType(
            {
                str(k): Propagation(
                    tuple(float(x) for x in r["gains"]),
                    float(r["rate"]),
                    int(r["horizon"]),
                    tuple(float(x) for x in r.get("max_gains") or ()),
                )
                for k, r in recs.items()
            }
        ),
    )


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
