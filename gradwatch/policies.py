"""Clipping policies: how much to scale a gradient, decided from its norm.

Each policy owns its state (``state_dict()`` / ``load_state_dict()``, plain JSON values,
exact round trip) and exposes ``update(norm) -> ClipDecision``. The arithmetic is written
out in each docstring because the backends re-implement it on device (TensorFlow runs it
in-graph) and are tested against these numpy/Python versions on the same norm sequences.

Conventions shared by every policy:

* ``update`` receives the global L2 norm of the gradient before clipping;
* the returned ``scale`` is 1 when ``norm <= threshold`` and otherwise
  ``threshold / (norm + 1e-6)``, the coefficient ``torch.nn.utils.clip_grad_norm_`` uses
  (which differs from 1 by at most 1e-6 relative in the band norm in (threshold - 1e-6,
  threshold]); so it lies in [0, 1], clipping never raises a norm, and a step counts as
  clipped only when the norm really was above the threshold;
* a non-finite norm changes no state and gives ``scale == 1``: there is nothing sensible
  to scale, and what happens to such a step is ``on_nonfinite``'s decision.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from gradwatch.errors import ConfigError
from gradwatch.records import ClipDecision

__all__ = ["ClipPolicy", "FixedNorm", "AutoClip", "ZClip", "AGC", "BUILTIN_POLICIES", "clip_scale"]

#: Added to the norm before dividing, as clip_grad_norm_ does, so a zero norm is harmless.
CLIP_EPS = 1e-6
STATE_VERSION = 1


def clip_scale(threshold: float, norm: float) -> float:
    """The factor that brings ``norm`` down to ``threshold``: 1 if it is not above it,
    else ``threshold / (norm + 1e-6)`` as in ``clip_grad_norm_``."""
    if norm <= threshold:
        return 1.0
    return min(1.0, threshold / (norm + CLIP_EPS))


@runtime_checkable
class ClipPolicy(Protocol):
    """What a clipping policy implements. Plugins register classes of this shape through
    the ``gradwatch_register_policies`` hook; ``name`` is the key users pass as
    ``policy="name"``."""

    name: ClassVar[str]
    #: True when the policy scales unit by unit (AGC) rather than by one global factor.
    unitwise: ClassVar[bool]

    def update(self, norm: float) -> ClipDecision: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _positive(owner: str, name: str, value: object, *, allow_none: bool = False, strict: bool = True) -> None:
    if allow_none and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if strict else value >= 0)  # type: ignore[operator]
    if not ok:
        rule = "> 0" if strict else ">= 0"
        extra = " or None" if allow_none else ""
        raise ConfigError(
            f"{owner}({name}={value!r}): {name} must be a finite number {rule}{extra}; received {value!r}.",
            option=name,
            value=value,
        )


class _Stateful:
    name: ClassVar[str] = ""
    unitwise: ClassVar[bool] = False

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if state.get("policy") != self.name:
            raise ConfigError(
                f"{type(self).__name__}.load_state_dict: the state belongs to policy "
                f"{state.get('policy')!r}, not {self.name!r}.",
                option="policy",
                value=state.get("policy"),
            )
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"{type(self).__name__}.load_state_dict: state version {state.get('version')!r} is not "
                f"supported (expected {STATE_VERSION}).",
                option="version",
                value=state.get("version"),
            )


class FixedNorm(_Stateful):
    """Clip the global gradient norm to ``max_norm`` (Pascanu, Mikolov & Bengio 2013,
    "On the difficulty of training recurrent neural networks", algorithm 1).

    scale = max_norm / (norm + 1e-6) when norm > max_norm, else 1: the coefficient of
    ``clip_grad_norm_`` and, up to the 1e-6, of Keras ``global_clipnorm``. Stateless.
    """

    name: ClassVar[str] = "fixed"

    def __init__(self, max_norm: float = 1.0) -> None:
        _positive("FixedNorm", "max_norm", max_norm)
        self.max_norm = float(max_norm)

    def update(self, norm: float) -> ClipDecision:
        if not math.isfinite(norm):
            return ClipDecision(self.max_norm, 1.0, self.name)
        return ClipDecision(self.max_norm, clip_scale(self.max_norm, norm), self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": STATE_VERSION, "max_norm": self.max_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        self.max_norm = float(state["max_norm"])

    def __repr__(self) -> str:
        return f"FixedNorm(max_norm={self.max_norm})"


class AutoClip(_Stateful):
    """Clip at the ``percentile``-th percentile of the gradient norms seen so far
    (Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks").

    At each step the current norm joins the history first (as in the paper's code), then
    threshold = percentile(history, p) with linear interpolation (numpy's default: the
    value at fractional rank (n - 1) * p / 100), and scale = clip_scale(threshold, norm).

    ``history=None`` keeps every finite norm (8 bytes a step, kept sorted so each step
    costs one binary insertion, not a sort); an integer keeps only the last ``history``
    norms, which bounds memory and lets the threshold follow a drifting norm.
    """

    name: ClassVar[str] = "autoclip"

    def __init__(self, percentile: float = 10.0, history: int | None = None) -> None:
        if not (isinstance(percentile, (int, float)) and not isinstance(percentile, bool) and 0 < percentile <= 100):
            raise ConfigError(
                f"AutoClip(percentile={percentile!r}): percentile must be a number in (0, 100]; received {percentile!r}.",
                option="percentile",
                value=percentile,
            )
        if history is not None and not (isinstance(history, int) and not isinstance(history, bool) and history >= 1):
            raise ConfigError(
                f"AutoClip(history={history!r}): history must be None or an integer >= 1; received {history!r}.",
                option="history",
                value=history,
            )
        self.percentile = float(percentile)
        self.history = history
        self._sorted: array[float] = array("d")
        self._order: deque[float] = deque()

    def _threshold(self) -> float:
        s = self._sorted
        pos = (len(s) - 1) * self.percentile / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        frac = pos - lo
        return s[lo] + (s[hi] - s[lo]) * frac

    def _push(self, norm: float) -> None:
        bisect.insort(self._sorted, norm)
        if self.history is not None:
            self._order.append(norm)
            if len(self._order) > self.history:
                old = self._order.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, old)]

    def update(self, norm: float) -> ClipDecision:
        if not math.isfinite(norm):
            thr = self._threshold() if self._sorted else math.inf
            return ClipDecision(thr, 1.0, self.name)
        self._push(float(norm))
        thr = self._threshold()
        return ClipDecision(thr, clip_scale(thr, norm), self.name)

    def state_dict(self) -> dict[str, Any]:
        norms = list(self._order) if self.history is not None else self._sorted.tolist()
        return {
            "policy": self.name,
            "version": STATE_VERSION,
            "percentile": self.percentile,
            "history": self.history,
            "norms": norms,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        self.percentile = float(state["percentile"])
        self.history = None if state["history"] is None else int(state["history"])
        norms = [float(v) for v in state["norms"]]
        self._order = deque(norms) if self.history is not None else deque()
        self._sorted = array("d", sorted(norms))

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history={self.history})"


class ZClip(_Stateful):
    """Z-score spike clipping with exponential moving statistics (Kumar et al. 2025,
    "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

    Warm-up: the first ``warmup`` finite norms are only collected (clipped at ``max_norm``
    if one is given); then mean = their mean and var = their population variance.
    After warm-up, with std = sqrt(var) and z = (norm - mean) / (std + 1e-6):

    * z > z_threshold (a spike): threshold = mean + z_threshold**2 * std / z, the
      "reciprocal" rule: the bigger the spike, the harder it is pulled back;
    * otherwise threshold = mean + z_threshold * std (where clipping would begin) and the
      gradient is left as it is.

    ``max_norm``, when given, caps the threshold at every step. The statistics are then
    updated with the norm *after* clipping, x = min(norm, threshold), so a spike does not
    contaminate them: mean <- alpha * mean + (1 - alpha) * x, then
    var <- alpha * var + (1 - alpha) * (x - mean)**2 with the updated mean.
    """

    name: ClassVar[str] = "zclip"

    def __init__(
        self, alpha: float = 0.97, z_threshold: float = 2.5, warmup: int = 25, max_norm: float | None = None
    ) -> None:
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1):
            raise ConfigError(
                f"ZClip(alpha={alpha!r}): alpha must be a number in (0, 1); received {alpha!r}.",
                option="alpha",
                value=alpha,
            )
        _positive("ZClip", "z_threshold", z_threshold)
        if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 1):
            raise ConfigError(
                f"ZClip(warmup={warmup!r}): warmup must be an integer >= 1; received {warmup!r}.",
                option="warmup",
                value=warmup,
            )
        _positive("ZClip", "max_norm", max_norm, allow_none=True)
        self.alpha = float(alpha)
        self.z_threshold = float(z_threshold)
        self.warmup = warmup
        self.max_norm = None if max_norm is None else float(max_norm)
        self._seen = 0
        self._buffer: list[float] = []
        self._mean = 0.0
        self._var = 0.0

    def update(self, norm: float) -> ClipDecision:
        cap = math.inf if self.max_norm is None else self.max_norm
        if not math.isfinite(norm):
            return ClipDecision(self._current_threshold(cap), 1.0, self.name)
        norm = float(norm)
        if self._seen < self.warmup:
            self._seen += 1
            self._buffer.append(norm)
            if self._seen == self.warmup:
                n = len(self._buffer)
                self._mean = math.fsum(self._buffer) / n
                self._var = math.fsum((x - self._mean) ** 2 for x in self._buffer) / n
                self._buffer = []
            return ClipDecision(cap, clip_scale(cap, norm) if math.isfinite(cap) else 1.0, self.name)
        std = math.sqrt(self._var)
        z = (norm - self._mean) / (std + CLIP_EPS)
        if z > self.z_threshold:
            thr = self._mean + self.z_threshold * self.z_threshold * std / z
        else:
            thr = self._mean + self.z_threshold * std
        thr = min(thr, cap)
        scale = clip_scale(thr, norm)
        x = min(norm, thr)
        a = self.alpha
        self._mean = a * self._mean + (1.0 - a) * x
        self._var = a * self._var + (1.0 - a) * (x - self._mean) ** 2
        return ClipDecision(thr, scale, self.name)

    def _current_threshold(self, cap: float) -> float:
        if self._seen < self.warmup:
            return cap
        return min(self._mean + self.z_threshold * math.sqrt(self._var), cap)

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "version": STATE_VERSION,
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup": self.warmup,
            "max_norm": self.max_norm,
            "seen": self._seen,
            "buffer": list(self._buffer),
            "mean": self._mean,
            "var": self._var,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        self.alpha = float(state["alpha"])
        self.z_threshold = float(state["z_threshold"])
        self.warmup = int(state["warmup"])
        self.max_norm = None if state["max_norm"] is None else float(state["max_norm"])
        self._seen = int(state["seen"])
        self._buffer = [float(v) for v in state["buffer"]]
        self._mean = float(state["mean"])
        self._var = float(state["var"])

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_threshold={self.z_threshold}, warmup={self.warmup}, "
            f"max_norm={self.max_norm})"
        )


class AGC(_Stateful):
    """Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan 2021,
    "High-Performance Large-Scale Image Recognition Without Normalization").

    Each unit's gradient is limited to ``clip_factor`` times the norm of that unit's
    weights (floored at ``eps``); see :func:`gradwatch._numerics.agc_clip` for the exact
    maths. The backends do the clipping on device, because it needs the weights; the
    record's ``clip.scale`` is the global norm after clipping over the norm before, and
    ``clip.threshold`` the clip factor. Stateless.
    """

    name: ClassVar[str] = "agc"
    unitwise: ClassVar[bool] = True

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        _positive("AGC", "clip_factor", clip_factor)
        _positive("AGC", "eps", eps)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)

    def update(self, norm: float) -> ClipDecision:
        # The scale of a unit-wise policy is known only after clipping: Monitor fills it
        # in from the clipped norms the backend reports.
        return ClipDecision(self.clip_factor, 1.0, self.name)

    def decision_from_norms(self, norm_before: float, norm_after: float) -> ClipDecision:
        """The record's decision once the backend has clipped unit by unit."""
        if not (math.isfinite(norm_before) and math.isfinite(norm_after)) or norm_before <= 0:
            return ClipDecision(self.clip_factor, 1.0, self.name)
        return ClipDecision(self.clip_factor, min(1.0, norm_after / norm_before), self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": STATE_VERSION, "clip_factor": self.clip_factor, "eps": self.eps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        self.clip_factor = float(state["clip_factor"])
        self.eps = float(state["eps"])

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"


BUILTIN_POLICIES: tuple[type[_Stateful], ...] = (FixedNorm, AutoClip, ZClip, AGC)
