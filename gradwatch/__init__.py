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
