"""TensorBoard: scalars a user can overlay, alerts as text, into a directory or your writer.

``"tensorboard:DIR"`` (or ``TensorBoardSink("DIR")``) writes event files with the standard
library only (:mod:`gradwatch._tfevents`: no tensorboard or protobuf package needed to
write). ``TensorBoardSink(writer=w)`` writes into a writer the user already has, so
gradwatch's curves sit beside the loss in the same run:

* a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's, or anything with
  ``add_scalar(tag, value, step)`` and ``add_text(tag, text, step)``);
* a ``tf.summary`` writer (``tf.summary.create_file_writer(...)``), written through
  ``tf.summary.scalar`` / ``tf.summary.text``.

The core imports no framework: writers are recognised by what they have, TensorFlow is
reached through ``sys.modules`` (it is loaded already when the user holds a TF writer).
A user's writer is flushed after each write but never closed: it is theirs.

Tags (the part before the first ``/`` is TensorBoard's section, so curves that belong
together sit side by side), written at each flush (every ``log_every`` steps, and at the
end of training); the ``through_time/`` ones at the step their propagation was measured
on (the window's latest measurement, often a few steps before the flush), and only for
layers measured in the window:

==============================================  ==========================================
``grad_norm/global``                            global gradient norm (before clipping)
``grad_norm/global_window_max``, ``..._mean``   its max / mean over the steps since the
                                                last flush (no spike between flushes lost)
``grad_norm/<layer>``                           each layer's gradient norm
``clip/threshold``, ``clip/scale``,             the policy's decision; the share of the
``clip/clipped_fraction``                       window's steps it clipped
``through_time/<layer>/rate``                   per-step gain of the gradient carried back
                                                through the layer's state (< 1 vanishing,
                                                > 1 exploding)
``through_time/<layer>/horizon``                steps back before it falls below
                                                ``vanish_ratio``
``through_time/<layer>/<recurrence>/rate``      the same per recurrence (``l0_reverse``, ...)
``through_time/<layer>/<recurrence>/horizon``   when a layer has several
``spectral/<weight>[<gate>]``                   largest singular value of each recurrent
                                                weight block
``gates/<layer>/forget_mean``                   LSTM mean forget gate
``alerts/<kind>[/<layer>]`` (text)              every alert, at its step, in full
==============================================  ==========================================

A directory sink also writes a custom-scalars layout (TensorBoard's "Custom Scalars"
dashboard): global and layer norms in one chart, the global norm over the clip threshold,
the through-time rates of all layers together, and so on.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gradwatch.errors import ConfigError
from gradwatch.events import GradEvent
from gradwatch.formatting import measured_steps
from gradwatch.records import StepRecord
from gradwatch.sinks import check_writable_dir

if TYPE_CHECKING:
    from gradwatch.view import MonitorView

__all__ = ["LAYOUT", "TensorBoardSink", "alert_tag", "alert_text", "tensorboard_scalars", "through_time_scalars"]

#: Tags of the global norm's own curves: a layer of that name gets ``_layer`` appended.
_GLOBAL_TAGS = frozenset({"global", "global_window_max", "global_window_mean"})

#: The custom-scalars layout of a directory sink: (category, [(chart, [tag regex])]).
LAYOUT: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    (
        "gradwatch",
        (
            ("gradient norm: global and per layer", (r"grad_norm/",)),
            ("global norm and clip threshold", (r"grad_norm/global$", r"grad_norm/global_window_max$", r"clip/threshold$")),
            ("through time: rate per step (< 1 vanishing, > 1 exploding)", (r"through_time/.*rate$",)),
            ("through time: horizon (steps)", (r"through_time/.*horizon$",)),
            ("largest singular value of recurrent weights", (r"spectral/",)),
        ),
    ),
)


def _finite(v: float | None) -> bool:
    """TensorBoard cannot show NaN, Inf or None; those steps are in the alerts."""
    return v is not None and math.isfinite(v)


def _layer_tag(layer: str) -> str:
    return f"{layer}_layer" if layer in _GLOBAL_TAGS else layer


def tensorboard_scalars(record: StepRecord, through_time: bool = True) -> Iterator[tuple[str, float]]:
    """The TensorBoard scalars of one flushed record, as (tag, value) pairs
    (``through_time=False``: without the ``through_time/`` ones, see
    :func:`through_time_scalars`)."""
    yield "grad_norm/global", record.global_norm
    w = record.window
    if w is not None:
        yield "grad_norm/global_window_max", w.norm_max
        yield "grad_norm/global_window_mean", w.norm_mean
    for layer, v in record.layer_norms.items():
        yield f"grad_norm/{_layer_tag(layer)}", v
    if record.clip is not None:
        yield "clip/threshold", record.clip.threshold
        yield "clip/scale", record.clip.scale
        if w is not None and w.steps:
            yield "clip/clipped_fraction", w.clipped / w.steps
    if through_time:
        for _, tag, value in through_time_scalars(record):
            yield tag, value
    for name, s in record.spectral.items():
        yield f"spectral/{name}", s
    for layer, g in record.gates.items():
        yield f"gates/{layer}/{g.gate}_mean", g.mean


def through_time_scalars(record: StepRecord) -> Iterator[tuple[int, str, float]]:
    """(step, tag, value) of each measured propagation in ``record``, at the step it was
    measured on (a flushed record's may be older than the flush: it is written there,
    never as the flush step's). A profile without a propagation measurement (rate NaN,
    horizon None) writes nothing."""
    measured_at = measured_steps(record)
    for layer, prof in record.temporal.items():
        if not prof.recurrences or prof.horizon is None:
            continue
        step = measured_at.get(layer, record.step)
        yield step, f"through_time/{layer}/rate", prof.gain
        yield step, f"through_time/{layer}/horizon", float(prof.horizon)
        if len(prof.recurrences) > 1:
            for name, rec in prof.recurrences.items():
                yield step, f"through_time/{layer}/{name}/rate", rec.rate
                yield step, f"through_time/{layer}/{name}/horizon", float(rec.horizon)


def alert_tag(event: GradEvent) -> str:
    """``alerts/<kind>``, ``/<layer>`` appended when the alert is about one layer."""
    return f"alerts/{event.kind}/{event.layer}" if event.layer else f"alerts/{event.kind}"


_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|])")


def _escape(text: str) -> str:
    """Markdown-escaped: names like ``lstm_cell/recurrent_kernel[f]`` stay as written."""
    return _MARKDOWN.sub(r"\\\1", text)


def alert_text(event: GradEvent) -> str:
    """The alert as TensorBoard's text dashboard shows it (markdown, names escaped)."""
    level = logging.getLevelName(event.severity)
    return f"**step {event.step}** ({level}): {_escape(event.message)}"


# --------------------------------------------------------------------------- writers
class _DirWriter:
    """gradwatch's own event file in a directory (opened at the first write)."""

    def __init__(self, logdir: Path) -> None:
        from gradwatch._tfevents import EventFileWriter, layout

        self._w = EventFileWriter(logdir)
        self._w.add_layout(layout(LAYOUT))

    def scalars(self, step: int, items: list[tuple[str, float]]) -> None:
        self._w.add_scalars(step, items)

    def text(self, step: int, tag: str, text: str) -> None:
        self._w.add_text(step, tag, text)

    def flush(self) -> None:
        return None  # every write is flushed

    def close(self) -> None:
        self._w.close()


class _AddScalarWriter:
    """A ``torch.utils.tensorboard.SummaryWriter`` or anything with its two methods.
    (torch's ``add_text`` appends ``/text_summary`` to the tag.)"""

    def __init__(self, writer: Any) -> None:
        self._w = writer

    def scalars(self, step: int, items: list[tuple[str, float]]) -> None:
        for tag, value in items:
            self._w.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self._w.add_text(tag, text, step)

    def flush(self) -> None:
        flush = getattr(self._w, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        self.flush()  # the user's writer: flushed, never closed


class _TFSummaryWriter:
    """A ``tf.summary`` writer, written through ``tf.summary.scalar`` / ``text``."""

    def __init__(self, writer: Any, tf: Any) -> None:
        self._w = writer
        self._tf = tf

    def scalars(self, step: int, items: list[tuple[str, float]]) -> None:
        tf = self._tf
        with self._w.as_default(), tf.init_scope():  # eager, even if called while tracing
            for tag, value in items:
                tf.summary.scalar(tag, value, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        tf = self._tf
        with self._w.as_default(), tf.init_scope():
            tf.summary.text(tag, text, step=step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.flush()  # the user's writer: flushed, never closed


def _adapt(writer: Any) -> Any:
    if callable(getattr(writer, "add_scalar", None)) and callable(getattr(writer, "add_text", None)):
        return _AddScalarWriter(writer)
    tf = sys.modules.get("tensorflow")
    if tf is not None and callable(getattr(writer, "as_default", None)) and callable(getattr(writer, "flush", None)):
        return _TFSummaryWriter(writer, tf)
    t = type(writer)
    raise ConfigError(
        f"TensorBoardSink(writer=...): expected a torch.utils.tensorboard.SummaryWriter (anything with add_scalar "
        f"and add_text) or a tf.summary writer (tf.summary.create_file_writer(logdir)); received an object of type "
        f"'{t.__module__}.{t.__qualname__}'.",
        option="sinks",
        value=writer,
    )


# ----------------------------------------------------------------------------- sink
class TensorBoardSink:
    """Gradient curves and alerts for TensorBoard, in ``logdir`` or in your own ``writer``.

    ``TensorBoardSink("runs/tb")`` is the ``"tensorboard:runs/tb"`` sink;
    ``TensorBoardSink(writer=summary_writer)`` writes into a writer you already use (see
    the module docstring for the tags). Pass it in ``sinks=[...]``.
    """

    scheme: ClassVar[str] = "tensorboard"

    def __init__(self, logdir: str | os.PathLike[str] | None = None, *, writer: Any = None) -> None:
        if (logdir is None) == (writer is None):
            raise ConfigError(
                "TensorBoardSink needs exactly one of a log directory (TensorBoardSink('runs/tb')) or a writer "
                "(TensorBoardSink(writer=SummaryWriter(...))).",
                option="sinks",
                value=logdir if writer is None else writer,
            )
        self.logdir = Path(logdir) if logdir is not None else None
        self._writer: Any = None
        if self.logdir is not None:
            if self.logdir.exists() and not self.logdir.is_dir():
                raise ConfigError(
                    f"gradwatch sink 'tensorboard:{logdir}': {str(logdir)!r} is a file, not a directory.",
                    option="sinks",
                    value=f"tensorboard:{logdir}",
                )
            check_writable_dir(f"tensorboard:{logdir}", self.logdir)
        else:
            self._writer = _adapt(writer)
        self._text_steps: dict[str, int] = {}
        self._last_step = 0

    @classmethod
    def from_spec(cls, arg: str | None, view: MonitorView) -> TensorBoardSink:
        if not arg:
            raise ConfigError(
                "gradwatch sink 'tensorboard:' needs a directory, e.g. 'tensorboard:runs/tb'.", option="sinks", value="tensorboard:"
            )
        return cls(arg)

    def _out(self) -> Any:
        if self._writer is None:
            assert self.logdir is not None
            self._writer = _DirWriter(self.logdir)
        return self._writer

    def write_record(self, record: StepRecord) -> None:
        by_step: dict[int, list[tuple[str, float]]] = {}
        by_step[record.step] = [(t, float(v)) for t, v in tensorboard_scalars(record, through_time=False) if _finite(v)]
        for step, tag, v in through_time_scalars(record):
            if _finite(v):
                by_step.setdefault(step, []).append((tag, float(v)))
        self._last_step = max(self._last_step, record.step)
        if any(by_step.values()):
            out = self._out()
            for step in sorted(by_step):
                if by_step[step]:
                    out.scalars(step, by_step[step])
            out.flush()

    def write_event(self, event: GradEvent) -> None:
        tag = alert_tag(event)
        # TensorBoard keeps one value per (tag, step): a second alert of the same kind and
        # layer at the same step (alert_every=0) gets a tag of its own.
        n = 2
        base = tag
        while self._text_steps.get(tag) == event.step:
            tag, n = f"{base}#{n}", n + 1
        self._text_steps[tag] = event.step
        self._last_step = max(self._last_step, event.step)
        out = self._out()
        out.text(event.step, tag, alert_text(event))
        out.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Alerts rate limiting held back, as one text at the last step (when any)."""
        held = summary.get("suppressed") or ()
        if not held or (self._writer is None and self._last_step == 0):
            return
        lines = [
            f"- {h['count']} further {h['kind']!r} alert(s)"
            + (f" for layer {_escape(repr(h['layer']))}" if h.get("layer") else "")
            + f" since step {h['first_step']}"
            for h in held
        ]
        text = "Held back by rate limiting (`alert_every`); the run file has every step:\n\n" + "\n".join(lines)
        out = self._out()
        out.text(int(summary.get("steps") or self._last_step), "alerts/held_back", text)
        out.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
