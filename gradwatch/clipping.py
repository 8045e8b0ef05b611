"""What every clipping policy shares: the protocols, a step's answer, the state format.

A policy is a pure function (the optax pattern): ``init() -> State`` and
``update(stats, state, ops) -> (Clip, State)``, over the array-ops layer
(:mod:`gradwatch.arrayops`), so one definition runs on the host (numpy) and inside a
traced step (TensorFlow). Whoever runs a policy owns its state (:class:`HostPolicy` in
the core, ``gradwatch_tf``'s in-graph runner on the device); both save it with
:meth:`Policy.dump_state`: one state format, one version. The policies themselves are
in :mod:`gradwatch.policies`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np

from gradwatch._state import STATE_VERSION, check_version
from gradwatch.arrayops import NUMPY, ArrayOps
from gradwatch.errors import ConfigError
from gradwatch.records import ClipDecision

__all__ = ["CLIP_EPS", "Clip", "ClipPolicy", "ClipStats", "HostPolicy", "Policy", "UnitwisePolicy", "clip_scale", "is_policy"]

#: Added to the norm before dividing, as clip_grad_norm_ does, so a zero norm is harmless.
CLIP_EPS = 1e-6


class Clip(NamedTuple):
    """A policy's answer at one step, as arrays of the ``ops`` it ran with."""

    threshold: Any
    scale: Any


@dataclass(frozen=True)
class ClipStats:
    """What a global-norm policy sees at one step."""

    #: Global L2 norm of the gradient before clipping (a float64 scalar; may be NaN/Inf).
    norm: Any


def clip_scale(threshold: Any, norm: Any, ops: ArrayOps = NUMPY) -> Any:
    """The factor that brings ``norm`` down to ``threshold``: 1 if it is not above it,
    else ``threshold / (norm + 1e-6)`` as in ``clip_grad_norm_``."""
    one = ops.asarray(1.0, "float64")
    return ops.where(norm <= threshold, one, ops.minimum(one, threshold / (norm + CLIP_EPS)))


@runtime_checkable
class ClipPolicy(Protocol):
    """What a global-norm clipping policy implements (plugins register such classes
    through ``gradwatch_register_policies``; ``name`` is the key of ``policy="name"``)."""

    name: ClassVar[str]
    unitwise: ClassVar[bool]

    def init(self) -> Any: ...

    def update(self, stats: ClipStats, state: Any, ops: ArrayOps = ...) -> tuple[Clip, Any]: ...

    def config(self) -> dict[str, Any]: ...

    def dump_state(self, state: Any) -> dict[str, Any]: ...

    def load_state(self, data: Mapping[str, Any]) -> Any: ...


@runtime_checkable
class UnitwisePolicy(Protocol):
    """A policy that scales each unit (output neuron) of each parameter on its own.

    The backend measures, on the device, the L2 norm of each unit of the weights and of
    the gradient, and multiplies the gradient by :meth:`unit_factor`. Stateless.
    """

    name: ClassVar[str]
    unitwise: ClassVar[bool]

    def unit_factor(self, param_norm: Any, grad_norm: Any, ops: ArrayOps) -> Any: ...

    def decision(self, norm_before: Any, norm_after: Any, ops: ArrayOps) -> Clip: ...

    def config(self) -> dict[str, Any]: ...


def is_policy(obj: object) -> bool:
    """True for an object that implements :class:`ClipPolicy` or :class:`UnitwisePolicy`."""
    if not isinstance(getattr(obj, "name", None), str):
        return False
    if getattr(obj, "unitwise", False):
        return all(callable(getattr(obj, m, None)) for m in ("unit_factor", "decision", "config"))
    return all(callable(getattr(obj, m, None)) for m in ("init", "update", "config", "dump_state", "load_state"))


class Policy:
    """Shared machinery: the state format, and a host copy for use without a watch.

    ``state_dict()`` / ``load_state_dict()`` and :meth:`decide` work on a state the
    policy object keeps for itself, for numpy users who drive a policy by hand. A watch
    never uses that copy: its runner owns the state it advances.
    """

    name: ClassVar[str] = ""
    unitwise: ClassVar[bool] = False

    def init(self) -> Any:
        raise NotImplementedError

    def update(self, stats: ClipStats, state: Any, ops: ArrayOps = NUMPY) -> tuple[Clip, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON values): a saved state fits only this config."""
        raise NotImplementedError

    # -- the one state format -----------------------------------------------------------
    def dump_state(self, state: Any) -> dict[str, Any]:
        """``{"policy", "version", "config", "state"}``, plain JSON values."""
        return {
            "policy": self.name,
            "version": STATE_VERSION,
            "config": self.config(),
            "state": {f.name: np.asarray(getattr(state, f.name)).tolist() for f in fields(state)} if state is not None else {},
        }

    def load_state(self, data: Mapping[str, Any]) -> Any:
        """The state saved by :meth:`dump_state`, checked against this policy."""
        owner = f"{type(self).__name__}.load_state_dict"
        check_version(data, owner)
        if data.get("policy") != self.name:
            raise ConfigError(
                f"{owner}: the state belongs to policy {data.get('policy')!r}, not {self.name!r}; pass the same "
                f"policy option when resuming.",
                option="policy",
                value=data.get("policy"),
            )
        if dict(data.get("config") or {}) != self.config():
            raise ConfigError(
                f"{owner}: the state was saved by {self.name!r} with {data.get('config')!r}, but this policy has "
                f"{self.config()!r}; construct it with the same arguments to resume.",
                option="policy",
                value=data.get("config"),
            )
        template = self.init()
        if template is None:
            return None
        saved = data.get("state") or {}
        values = {}
        for f in fields(template):
            ref = np.asarray(getattr(template, f.name))
            try:
                arr = np.asarray(saved[f.name], dtype=ref.dtype)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{owner}: field {f.name!r} of the saved state is missing or malformed ({exc}).", option="state") from None
            if arr.shape != ref.shape:
                raise ConfigError(f"{owner}: field {f.name!r} has shape {arr.shape}, expected {ref.shape}.", option="state")
            values[f.name] = arr
        return type(template)(**values)

    # -- host convenience -----------------------------------------------------------------
    def decide(self, norm: float) -> ClipDecision:
        """Run one step on the policy's own host state (numpy); for use without a watch."""
        if not hasattr(self, "_host"):
            self._host = HostPolicy(self)
        return self._host.decide(norm)

    def state_dict(self) -> dict[str, Any]:
        """The policy's own host state (see :meth:`decide`), in the one state format."""
        if not hasattr(self, "_host"):
            self._host = HostPolicy(self)
        return self._host.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not hasattr(self, "_host"):
            self._host = HostPolicy(self)
        self._host.load_state_dict(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class HostPolicy:
    """Runs a global-norm policy on the host with numpy and owns its state.

    The monitor decides through one of these unless a backend decides on the device.
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.state = policy.init()

    def decide(self, norm: float) -> ClipDecision:
        with np.errstate(all="ignore"):
            clip, self.state = self.policy.update(ClipStats(np.float64(norm)), self.state, NUMPY)
        return ClipDecision(float(clip.threshold), float(clip.scale), self.policy.name)

    def state_dict(self) -> dict[str, Any]:
        return self.policy.dump_state(self.state)  # type: ignore[no-any-return]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = self.policy.load_state(state)


def _number(owner: str, name: str, value: object, rule: str, ok: bool) -> None:
    if not ok:
        raise ConfigError(f"{owner}({name}={value!r}): {name} must be {rule}; received {value!r}.", option=name, value=value)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(float(v))  # type: ignore[arg-type]
