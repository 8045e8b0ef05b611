"""gradwatch: see what your gradients do while you train, and act on it.

Vanilla RNNs lose (vanish) or blow up (explode) their gradients through time; gradwatch
measures every optimizer step of an existing model (per-parameter and per-layer norms,
per-timestep profiles of recurrent layers, recurrent spectral norms), raises alerts, and
with a policy clips adaptively. The core needs numpy and pluggy only; the PyTorch and
Keras backends are plugins found through entry points, loaded at the first ``watch()``.
"""

from __future__ import annotations

from gradwatch import policies
from gradwatch.errors import ConfigError, GradwatchError, NonFiniteGradientError
from gradwatch.events import EVENT_KINDS, EventKind, GradEvent
from gradwatch.jsonl import RunFileError, read_jsonl, read_run
from gradwatch.monitor import Monitor
from gradwatch.options import Options
from gradwatch.policies import AGC, AutoClip, ClipPolicy, FixedNorm, ZClip
from gradwatch.records import ClipDecision, GateStats, StepRecord, TemporalProfile, WindowStats
from gradwatch.sinks import JsonlSink, LoggingSink, MemorySink, TensorBoardSink
from gradwatch.watch import Watch, watch

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "watch",
    "Watch",
    "Monitor",
    "Options",
    "StepRecord",
    "ClipDecision",
    "TemporalProfile",
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
    "FixedNorm",
    "AutoClip",
    "ZClip",
    "AGC",
    "LoggingSink",
    "MemorySink",
    "JsonlSink",
    "TensorBoardSink",
]
