"""The ``"tensorboard:DIR"`` sink: scalars TensorBoard reads, with the standard library only.

(The event-file format is written by :mod:`gradwatch._tfevents`; no tensorboard or
protobuf package is needed to write.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gradwatch.errors import ConfigError
from gradwatch.events import GradEvent
from gradwatch.records import StepRecord
from gradwatch.sinks import check_writable_dir

if TYPE_CHECKING:
    from gradwatch.view import MonitorView

__all__ = ["TensorBoardSink", "tensorboard_scalars"]


def tensorboard_scalars(record: StepRecord) -> Iterator[tuple[str, float]]:
    """The TensorBoard scalars of one flushed record, as (tag, value) pairs."""
    yield "grad/global_norm", record.global_norm
    if record.window is not None:
        yield "grad/window_max", record.window.norm_max
        yield "grad/window_mean", record.window.norm_mean
    for layer, v in record.layer_norms.items():
        yield f"grad_layer/{layer}", v
    if record.clip is not None:
        yield "clip/threshold", record.clip.threshold
        yield "clip/scale", record.clip.scale
    for layer, prof in record.temporal.items():
        yield f"temporal/{layer}/gain", prof.gain
        yield f"temporal/{layer}/horizon", float(prof.horizon)
    for name, s in record.spectral.items():
        yield f"spectral/{name}", s
    for layer, g in record.gates.items():
        yield f"gates/{layer}/{g.gate}_mean", g.mean


class TensorBoardSink:
    """Scalars in a TensorBoard log directory (no tensorboard package needed to write)."""

    scheme: ClassVar[str] = "tensorboard"

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = Path(logdir)
        if self.logdir.exists() and not self.logdir.is_dir():
            raise ConfigError(
                f"gradwatch sink 'tensorboard:{logdir}': {str(logdir)!r} is a file, not a directory.",
                option="sinks",
                value=f"tensorboard:{logdir}",
            )
        check_writable_dir(f"tensorboard:{logdir}", self.logdir)
        self._writer: Any = None

    @classmethod
    def from_spec(cls, arg: str | None, view: MonitorView) -> TensorBoardSink:
        if not arg:
            raise ConfigError(
                "gradwatch sink 'tensorboard:' needs a directory, e.g. 'tensorboard:runs/tb'.", option="sinks", value="tensorboard:"
            )
        return cls(arg)

    def write_record(self, record: StepRecord) -> None:
        if self._writer is None:
            from gradwatch._tfevents import EventFileWriter

            self._writer = EventFileWriter(self.logdir)
        # TensorBoard cannot show NaN/Inf meaningfully; those steps are in the events.
        self._writer.add_scalars(record.step, ((t, v) for t, v in tensorboard_scalars(record) if math.isfinite(v)))

    def write_event(self, event: GradEvent) -> None:
        return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
