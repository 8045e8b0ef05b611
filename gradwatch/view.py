"""What plugins, detectors, sinks and backends see of a monitor: small protocols.

Hooks, detectors and sinks receive a :class:`MonitorView`, a read-only view (options,
names, layers, the step count, the profiling schedule), never the monitor itself, so the
monitor's internals are not de facto plugin API. A backend gets a :class:`MonitorPort`:
the view plus the few calls that feed a step in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gradwatch._layout import StepStats
    from gradwatch.events import GradEvent
    from gradwatch.options import Options
    from gradwatch.records import StepRecord

__all__ = ["MonitorPort", "MonitorView", "ReadOnlyView"]


@runtime_checkable
class MonitorView(Protocol):
    """Read-only facts about a run, for detectors, sinks and plugins."""

    @property
    def options(self) -> Options:
        """The validated options of the run."""
        ...

    @property
    def step(self) -> int:
        """Optimizer steps recorded so far."""
        ...

    @property
    def names(self) -> tuple[str, ...]:
        """Bound parameter names (the framework's own), in bound order."""
        ...

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names, in order of first appearance among the parameters."""
        ...

    @property
    def policy_name(self) -> str | None:
        """The clipping policy's registry name, or None (observe only)."""
        ...

    @property
    def meta(self) -> Mapping[str, Any]:
        """Facts the backend reported (read-only): ``backend``, the framework version,
        ``recurrent_layers`` (layer -> kind: "rnn_tanh", "rnn_relu", "lstm", "gru")."""
        ...

    def layer_of(self, param: str) -> str | None:
        """The layer a bound parameter belongs to."""
        ...

    def profile_due(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the next one) is a profiled step."""
        ...

    def header(self) -> dict[str, Any]:
        """What the run file's header says about this run."""
        ...


@runtime_checkable
class MonitorPort(MonitorView, Protocol):
    """What a backend uses: the view, plus binding parameters and feeding steps in."""

    @property
    def policy(self) -> Any:
        """The resolved policy object (a ClipPolicy or UnitwisePolicy) or None."""
        ...

    @property
    def meta(self) -> dict[str, Any]:  # type: ignore[override]
        """Facts for the run file's header, writable by the backend: ``backend``, the
        framework version, ``recurrent_layers`` (layer -> "rnn_tanh" | "rnn_relu" |
        "lstm" | "gru"). Set them at attach time with ``setdefault``."""
        ...

    @property
    def next_step(self) -> int: ...

    def bind(self, names: Sequence[str], layers: Sequence[str] | None = None) -> None: ...

    def process(self, stats: StepStats) -> StepRecord: ...

    def emit(self, event: GradEvent) -> None: ...

    def set_distributed(self, rank: int, world_size: int) -> None: ...

    def decide_on_device(self, runner: Any) -> None:
        """Hand the policy to a runner on the device (it gets the current policy state and
        owns it from now on: ``state_dict()`` / ``load_state_dict()``); ``None`` takes
        the state back to the host."""
        ...


class ReadOnlyView:
    """The read-only :class:`MonitorView` of a monitor: what hooks, detectors and sinks get."""

    __slots__ = ("_m",)

    def __init__(self, monitor: Any) -> None:
        self._m = monitor

    options = property(lambda self: self._m.options)
    step = property(lambda self: self._m.step_count)
    names = property(lambda self: self._m.names)
    layers = property(lambda self: self._m.layers)
    policy_name = property(lambda self: None if self._m.policy is None else self._m.policy.name)
    meta = property(lambda self: MappingProxyType(self._m.meta))
    #: Facts the backend reads when asked, because they change as training goes on and an
    #: alert must not show an old number as new (a read-only mapping of callables:
    #: ``forget_bias(layer, recurrence) -> float | None``, that recurrence's mean
    #: forget-gate bias now). May be empty; a missing or failing entry means "unknown".
    #: Not part of the :class:`MonitorView` protocol (read it with ``getattr``), so views
    #: written before it still satisfy ``isinstance(view, MonitorView)``.
    live = property(lambda self: MappingProxyType(getattr(self._m, "live", {})))

    def layer_of(self, param: str) -> str | None:
        return self._m.layer_of(param)

    def profile_due(self, step: int | None = None) -> bool:
        return self._m.profile_due(step)

    def header(self) -> dict[str, Any]:
        return self._m.header()
