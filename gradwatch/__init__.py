"""gradwatch: see what your gradients do while you train, and act on it.

Vanilla RNNs lose (vanish) or blow up (explode) their gradients through time; gradwatch
measures every optimizer step of an existing model (per-parameter and per-layer norms,
per-timestep profiles of recurrent layers, recurrent spectral norms), raises alerts, and
with a policy clips adaptively. The core needs numpy and pluggy only; the PyTorch and
Keras backends are plugins found through entry points, loaded at the first ``watch()``.

Plugin and backend authors find their names here too: the hook markers, the protocols a
hook receives (``MonitorView``, ``MonitorPort``), the statistics layout (``Layout``,
``Segment``, ``StepStats``), the array-ops layer policies run on, ``Attachment`` and
``HandleGroup``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time see __getattr__
    from gradwatch import policies
    from gradwatch._layout import Layout, Segment, StepStats
    from gradwatch._state import STATE_VERSION
    from gradwatch.arrayops import NUMPY, ArrayOps
    from gradwatch.attachment import Attachment, HandleGroup
    from gradwatch.errors import ConfigError, GradwatchError, NonFiniteGradientError
    from gradwatch.events import EVENT_KINDS, EventKind, GradEvent
    from gradwatch.hookspecs import hookimpl
    from gradwatch.jsonl import RunFileError, read_jsonl, read_run
    from gradwatch.monitor import Monitor, infer_layer
    from gradwatch.options import Options, profile_due
    from gradwatch.policies import AGC, AutoClip, ClipPolicy, FixedNorm, UnitwisePolicy, ZClip
    from gradwatch.records import ClipDecision, GateStats, Propagation, StepRecord, TemporalProfile, WindowStats
    from gradwatch.sinks import JsonlSink, LoggingSink, MemorySink
    from gradwatch.tensorboard import TensorBoardSink
    from gradwatch.view import MonitorPort, MonitorView
    from gradwatch.watch import Watch, watch, watch_with

#: Where each public name lives. ``import gradwatch`` imports none of these modules (nor
#: numpy): a name is imported the first time it is used (PEP 562 ``__getattr__``), so
#: importing gradwatch costs about a millisecond and the first ``watch()`` pays for what
#: it needs (issue 20: ``import gradwatch`` under 100 ms).
_LAZY: dict[str, str] = {
    "policies": "gradwatch.policies",
    "Layout": "gradwatch._layout",
    "Segment": "gradwatch._layout",
    "StepStats": "gradwatch._layout",
    "STATE_VERSION": "gradwatch._state",
    "NUMPY": "gradwatch.arrayops",
    "ArrayOps": "gradwatch.arrayops",
    "Attachment": "gradwatch.attachment",
    "HandleGroup": "gradwatch.attachment",
    "ConfigError": "gradwatch.errors",
    "GradwatchError": "gradwatch.errors",
    "NonFiniteGradientError": "gradwatch.errors",
    "EVENT_KINDS": "gradwatch.events",
    "EventKind": "gradwatch.events",
    "GradEvent": "gradwatch.events",
    "hookimpl": "gradwatch.hookspecs",
    "RunFileError": "gradwatch.jsonl",
    "read_jsonl": "gradwatch.jsonl",
    "read_run": "gradwatch.jsonl",
    "Monitor": "gradwatch.monitor",
    "infer_layer": "gradwatch.monitor",
    "Options": "gradwatch.options",
    "profile_due": "gradwatch.options",
    "AGC": "gradwatch.policies",
    "AutoClip": "gradwatch.policies",
    "ClipPolicy": "gradwatch.policies",
    "FixedNorm": "gradwatch.policies",
    "UnitwisePolicy": "gradwatch.policies",
    "ZClip": "gradwatch.policies",
    "ClipDecision": "gradwatch.records",
    "GateStats": "gradwatch.records",
    "Propagation": "gradwatch.records",
    "StepRecord": "gradwatch.records",
    "TemporalProfile": "gradwatch.records",
    "WindowStats": "gradwatch.records",
    "JsonlSink": "gradwatch.sinks",
    "LoggingSink": "gradwatch.sinks",
    "MemorySink": "gradwatch.sinks",
    "TensorBoardSink": "gradwatch.tensorboard",
    "MonitorPort": "gradwatch.view",
    "MonitorView": "gradwatch.view",
    "Watch": "gradwatch.watch",
    "watch": "gradwatch.watch",
    "watch_with": "gradwatch.watch",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "policies" else getattr(mod, name)  # the one submodule among the names
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package's module type: ``gradwatch.watch`` stays the function.

    Importing the submodule ``gradwatch.watch`` makes the import system set the package
    attribute ``watch`` to that module; the eager ``from gradwatch.watch import watch``
    this file used to run rebound it to the function right after. Lazily there is no
    such second binding, so it is done here when the submodule is bound.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "watch" and isinstance(value, types.ModuleType) and value.__name__ == "gradwatch.watch":
            value = value.watch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.2.0"

__all__ = [
    "__version__",
    "watch",
    "watch_with",
    "Watch",
    "Monitor",
    "Options",
    "StepRecord",
    "ClipDecision",
    "TemporalProfile",
    "Propagation",
    "GateStats",
    "WindowStats",
    "GradEvent",
    "EventKind",
    "EVENT_KINDS",
    "GradwatchError",
    "ConfigError",
    "NonFiniteGradientError",
    "RunFileError",
    "read_jsonl",
    "read_run",
    "policies",
    "ClipPolicy",
    "UnitwisePolicy",
    "FixedNorm",
    "AutoClip",
    "ZClip",
    "AGC",
    "LoggingSink",
    "MemorySink",
    "JsonlSink",
    "TensorBoardSink",
    # for plugin and backend authors
    "hookimpl",
    "MonitorView",
    "MonitorPort",
    "Attachment",
    "HandleGroup",
    "Layout",
    "Segment",
    "StepStats",
    "ArrayOps",
    "NUMPY",
    "STATE_VERSION",
    "infer_layer",
    "profile_due",
]
