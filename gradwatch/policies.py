"""The clipping policies: FixedNorm, AutoClip, ZClip (global norm) and AGC (unit-wise).

Each is defined once, as pure functions over the array-ops layer (see
:mod:`gradwatch.clipping` for the protocol and the state format), so the host and the
device run the same maths. Conventions shared by every global-norm policy:

* ``stats.norm`` is the global L2 norm of the gradient before clipping;
* ``scale`` is 1 when ``norm <= threshold`` and otherwise ``threshold / (norm + 1e-6)``,
  the coefficient of ``torch.nn.utils.clip_grad_norm_``: it lies in [0, 1], clipping
  never raises a norm, and a step counts as clipped only when the norm was above the
  threshold;
* a non-finite norm changes no state and gives ``scale == 1``: there is nothing sensible
  to scale, and what happens to such a step is ``on_nonfinite``'s decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gradwatch._state import check_version
from gradwatch.arrayops import NUMPY, ArrayOps
from gradwatch.clipping import (
    CLIP_EPS,
    Clip,
    ClipPolicy,
    ClipStats,
    HostPolicy,
    Policy,
    UnitwisePolicy,
    _is_real,
    _number,
    clip_scale,
    is_policy,
)
from gradwatch.errors import ConfigError

__all__ = [
    "AGC",
    "AUTOCLIP_DEFAULT_HISTORY",
    "BUILTIN_POLICIES",
    "CLIP_EPS",
    "AutoClip",
    "AutoClipState",
    "Clip",
    "ClipPolicy",
    "ClipStats",
    "FixedNorm",
    "FixedNormState",
    "HostPolicy",
    "Policy",
    "UnitwisePolicy",
    "ZClip",
    "ZClipState",
    "clip_scale",
    "is_policy",
]

#: Norms AutoClip keeps when ``history=None``. A fixed size is what a device (XLA) needs
#: and what keeps memory bounded on long runs; sorting 8,192 norms costs about 0.1 ms.
AUTOCLIP_DEFAULT_HISTORY = 8192


# --------------------------------------------------------------------------- FixedNorm
@dataclass(frozen=True)
class FixedNormState:
    """FixedNorm keeps no state."""


class FixedNorm(Policy):
    """Clip the global gradient norm to ``max_norm`` (Pascanu, Mikolov & Bengio 2013,
    "On the difficulty of training recurrent neural networks", algorithm 1).

    scale = max_norm / (norm + 1e-6) when norm > max_norm, else 1: the coefficient of
    ``clip_grad_norm_`` and, up to the 1e-6, of Keras ``global_clipnorm``.
    """

    name: ClassVar[str] = "fixed"

    def __init__(self, max_norm: float = 1.0) -> None:
        _number("FixedNorm", "max_norm", max_norm, "a finite number > 0", _is_real(max_norm) and max_norm > 0)
        self.max_norm = float(max_norm)

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def init(self) -> FixedNormState:
        return FixedNormState()

    def update(self, stats: ClipStats, state: FixedNormState, ops: ArrayOps = NUMPY) -> tuple[Clip, FixedNormState]:
        norm = ops.asarray(stats.norm, "float64")
        thr = ops.asarray(self.max_norm, "float64")
        finite = ops.isfinite(norm)
        safe = ops.where(finite, norm, ops.asarray(0.0, "float64"))
        return Clip(thr, ops.where(finite, clip_scale(thr, safe, ops), ops.asarray(1.0, "float64"))), state


# ---------------------------------------------------------------------------- AutoClip
@dataclass(frozen=True)
class AutoClipState:
    """AutoClip's memory of past norms."""

    #: (history,) float64 ring of the last finite norms; +inf marks a slot not yet used.
    norms: Any
    #: int64: finite norms seen in all; the next one goes to slot ``count % history``.
    count: Any


class AutoClip(Policy):
    """Clip at the ``percentile``-th percentile of the gradient norms seen so far
    (Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks").

    At each step the current norm joins the history first (as in the paper's code), then
    threshold = percentile(history, p) with linear interpolation (numpy's default: the
    value at fractional rank (n - 1) * p / 100), and scale = clip_scale(threshold, norm).
    ``history`` is the number of most recent norms kept; ``None`` keeps the last
    :data:`AUTOCLIP_DEFAULT_HISTORY` (8,192), which bounds memory and gives the state the
    fixed shape a device needs.
    """

    name: ClassVar[str] = "autoclip"

    def __init__(self, percentile: float = 10.0, history: int | None = None) -> None:
        _number("AutoClip", "percentile", percentile, "a number in (0, 100]", _is_real(percentile) and 0 < percentile <= 100)
        ok = history is None or (isinstance(history, int) and not isinstance(history, bool) and history >= 1)
        _number("AutoClip", "history", history, "None or an integer >= 1", ok)
        self.percentile = float(percentile)
        self.history = history
        self.capacity = int(history) if history is not None else AUTOCLIP_DEFAULT_HISTORY

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "history": self.history}

    def init(self) -> AutoClipState:
        return AutoClipState(np.full(self.capacity, np.inf), np.asarray(0, dtype=np.int64))

    def threshold(self, norms: Any, count: Any, ops: ArrayOps = NUMPY) -> Any:
        """The percentile of the stored norms (+inf when none is stored yet)."""
        w = ops.minimum(count, ops.asarray(self.capacity, "int64"))
        s = ops.sort(norms)
        pos = ops.cast(w - 1, "float64") * (self.percentile / 100.0)
        lo = ops.cast(ops.floor(pos), "int64")
        hi = ops.minimum(lo + 1, w - 1)
        frac = pos - ops.cast(lo, "float64")
        zero = ops.asarray(0, "int64")
        lo_v = ops.take(s, ops.maximum(lo, zero))
        hi_v = ops.take(s, ops.maximum(hi, zero))
        # lo_v where they coincide: inf - inf would be NaN while nothing is stored yet.
        interp = ops.where(hi_v > lo_v, lo_v + (hi_v - lo_v) * frac, lo_v)
        return ops.where(w > zero, interp, ops.asarray(math.inf, "float64"))

    def update(self, stats: ClipStats, state: AutoClipState, ops: ArrayOps = NUMPY) -> tuple[Clip, AutoClipState]:
        norm = ops.asarray(stats.norm, "float64")
        finite = ops.isfinite(norm)
        x = ops.where(finite, norm, ops.asarray(0.0, "float64"))
        slot = state.count % self.capacity
        norms = ops.where(finite, ops.put(state.norms, slot, x), state.norms)
        count = ops.where(finite, state.count + 1, state.count)
        thr = self.threshold(norms, count, ops)
        scale = ops.where(finite, clip_scale(thr, x, ops), ops.asarray(1.0, "float64"))
        return Clip(thr, scale), AutoClipState(norms, count)

    def dump_state(self, state: Any) -> dict[str, Any]:
        """Only the stored norms, oldest first (no +inf placeholders: strict JSON)."""
        out = super().dump_state(None)
        count = int(np.asarray(state.count))
        ring = np.asarray(state.norms, dtype=np.float64)
        n = min(count, self.capacity)
        order = [(count - n + i) % self.capacity for i in range(n)]
        out["state"] = {"norms": ring[order].tolist(), "count": count}
        return out

    def load_state(self, data: Mapping[str, Any]) -> AutoClipState:
        check_version(data, "AutoClip.load_state_dict")
        empty = {"norms": np.full(self.capacity, np.inf).tolist(), "count": 0}
        ring = np.asarray(Policy.load_state(self, {**data, "state": empty}).norms).copy()  # policy and config checks
        saved = data.get("state")
        try:
            norms = [float(v) for v in saved["norms"]]  # type: ignore[index]
            count = int(saved["count"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"AutoClip.load_state_dict: the saved state is malformed ({exc!r}).", option="state") from None
        n = len(norms)
        if n > self.capacity or n > count or not all(math.isfinite(v) for v in norms):
            raise ConfigError("AutoClip.load_state_dict: the saved norms do not fit this policy's history.", option="state")
        for i, v in enumerate(norms):
            ring[(count - n + i) % self.capacity] = v
        return AutoClipState(ring, np.asarray(count, dtype=np.int64))


# ------------------------------------------------------------------------------- ZClip
@dataclass(frozen=True)
class ZClipState:
    """ZClip's running statistics of the (clipped) norm."""

    #: int64: finite norms seen, counted up to ``warmup`` (then it stays there).
    seen: Any
    #: (warmup,) float64: the norms of the warm-up steps; zeros once warm-up is over.
    buffer: Any
    #: float64: exponential moving mean of the norm after clipping.
    mean: Any
    #: float64: exponential moving variance of the norm after clipping.
    var: Any


class ZClip(Policy):
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

    def __init__(self, alpha: float = 0.97, z_threshold: float = 2.5, warmup: int = 25, max_norm: float | None = None) -> None:
        _number("ZClip", "alpha", alpha, "a number in (0, 1)", _is_real(alpha) and 0 < alpha < 1)
        _number("ZClip", "z_threshold", z_threshold, "a finite number > 0", _is_real(z_threshold) and z_threshold > 0)
        ok = isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 1
        _number("ZClip", "warmup", warmup, "an integer >= 1", ok)
        ok = max_norm is None or (_is_real(max_norm) and max_norm > 0)
        _number("ZClip", "max_norm", max_norm, "a finite number > 0 or None", ok)
        self.alpha = float(alpha)
        self.z_threshold = float(z_threshold)
        self.warmup = warmup
        self.max_norm = None if max_norm is None else float(max_norm)

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_threshold": self.z_threshold, "warmup": self.warmup, "max_norm": self.max_norm}

    def init(self) -> ZClipState:
        f = np.float64
        return ZClipState(np.asarray(0, dtype=np.int64), np.zeros(self.warmup), f(0.0), f(0.0))

    def update(self, stats: ClipStats, state: ZClipState, ops: ArrayOps = NUMPY) -> tuple[Clip, ZClipState]:
        f64 = "float64"
        a, zt, n = self.alpha, self.z_threshold, self.warmup
        cap = ops.asarray(math.inf if self.max_norm is None else self.max_norm, f64)
        one = ops.asarray(1.0, f64)
        norm = ops.asarray(stats.norm, f64)
        finite = ops.isfinite(norm)
        x = ops.where(finite, norm, ops.asarray(0.0, f64))
        seen, buf, mean, var = state.seen, state.buffer, state.mean, state.var
        in_warmup = seen < n

        # Warm-up: collect; on the last warm-up step, mean and population variance.
        wbuf = ops.put(buf, ops.minimum(seen, ops.asarray(n - 1, "int64")), x)
        w_mean = ops.sum(wbuf) / n
        dev = wbuf - w_mean
        w_var = ops.sum(dev * dev) / n
        done = ops.logical_and(in_warmup, seen + 1 >= n)
        warm_mean = ops.where(done, w_mean, mean)
        warm_var = ops.where(done, w_var, var)
        warm_scale = clip_scale(cap, x, ops) if self.max_norm is not None else one

        # After warm-up: the reciprocal rule.
        std = ops.sqrt(var)
        z = (x - mean) / (std + CLIP_EPS)
        spike = z > zt
        safe_z = ops.where(spike, z, one)
        thr = ops.minimum(ops.where(spike, mean + zt * zt * std / safe_z, mean + zt * std), cap)
        st_scale = clip_scale(thr, x, ops)
        xc = ops.minimum(x, thr)
        st_mean = a * mean + (1.0 - a) * xc
        st_var = a * var + (1.0 - a) * (xc - st_mean) * (xc - st_mean)

        # A non-finite norm reports the current threshold and changes nothing.
        cur_thr = ops.where(in_warmup, cap, ops.minimum(mean + zt * std, cap))
        threshold = ops.where(finite, ops.where(in_warmup, cap, thr), cur_thr)
        scale = ops.where(finite, ops.where(in_warmup, warm_scale, st_scale), one)
        collect = ops.logical_and(finite, in_warmup)
        new_state = ZClipState(
            seen=ops.where(collect, seen + 1, seen),
            buffer=ops.where(ops.logical_and(collect, ops.logical_not(done)), wbuf, ops.where(ops.logical_and(finite, done), buf * 0.0, buf)),
            mean=ops.where(finite, ops.where(in_warmup, warm_mean, st_mean), mean),
            var=ops.where(finite, ops.where(in_warmup, warm_var, st_var), var),
        )
        return Clip(threshold, scale), new_state


# --------------------------------------------------------------------------------- AGC
class AGC(Policy):
    """Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan 2021,
    "High-Performance Large-Scale Image Recognition Without Normalization", eq. 3).

    For each unit i (an output neuron: a row of a PyTorch ``(out, in)`` weight, a column
    of a Keras ``(in, out)`` kernel; a vector is one unit): if
    ||G_i|| > clip_factor * max(||W_i||, eps), then G_i <- G_i * clip_factor *
    max(||W_i||, eps) / ||G_i||; otherwise G_i is unchanged. The ``eps`` floor keeps
    zero-initialised parameters (biases) from having their gradients clipped to zero.
    The record's ``clip.scale`` is the global norm after clipping over the norm before,
    and ``clip.threshold`` the clip factor. Stateless.
    """

    name: ClassVar[str] = "agc"
    unitwise: ClassVar[bool] = True

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        _number("AGC", "clip_factor", clip_factor, "a finite number > 0", _is_real(clip_factor) and clip_factor > 0)
        _number("AGC", "eps", eps, "a finite number > 0", _is_real(eps) and eps > 0)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)

    def config(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps}

    def init(self) -> None:
        return None

    def unit_factor(self, param_norm: Any, grad_norm: Any, ops: ArrayOps = NUMPY) -> Any:
        """The factor of each unit, from the unit norms of the weights and the gradient.

        A zero gradient unit gets 1 (the divisor is clamped, so 0/0 never appears).
        """
        limit = ops.maximum(param_norm, ops.ones_like(param_norm) * self.eps) * self.clip_factor
        return ops.where(grad_norm > limit, limit / ops.maximum(grad_norm, ops.ones_like(grad_norm) * 1e-6), ops.ones_like(grad_norm))

    def decision(self, norm_before: Any, norm_after: Any, ops: ArrayOps = NUMPY) -> Clip:
        """scale = min(1, after / before); 1 when either norm is non-finite or before is 0."""
        ok = ops.logical_and(ops.logical_and(ops.isfinite(norm_before), ops.isfinite(norm_after)), norm_before > 0)
        one = ops.ones_like(norm_before)
        safe = ops.where(ok, norm_before, one)
        return Clip(ops.asarray(self.clip_factor, "float64"), ops.where(ok, ops.minimum(one, norm_after / safe), one))


BUILTIN_POLICIES: tuple[type[Policy], ...] = (FixedNorm, AutoClip, ZClip, AGC)
