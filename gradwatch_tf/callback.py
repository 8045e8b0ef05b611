"""``GradWatchCallback``: gradwatch for ``model.fit``, a thin adapter over ``gradwatch.Watch``.

Keras' ``fit`` owns the training loop, so there is no place for a hook around
``optimizer.apply`` other than the optimizer itself: at train begin the callback makes a
:class:`~gradwatch_tf.attach.TFAttachment` (which wraps ``apply`` on the optimizer
instance) and hands it to its :class:`~gradwatch.Watch`; at train end the watch detaches
it again, so the optimizer and the model are exactly as they were. The gradients are
measured and clipped inside the traced step; the callback only reads the per-step ring
buffer once per batch end. Records, events and state live in the watch across fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras

from gradwatch import Monitor, Watch
from gradwatch.errors import NonFiniteGradientError
from gradwatch.events import GradEvent
from gradwatch.records import StepRecord
from gradwatch_tf.attach import TFAttachment

logger = logging.getLogger("gradwatch")

__all__ = ["GradWatchCallback"]


class GradWatchCallback(keras.callbacks.Callback):
    """Watch the gradients of ``model.fit`` (options as in ``gradwatch.watch``).

    The options are validated here (a bad one raises ``gradwatch.ConfigError`` before
    training starts). ``logs["grad_norm"]`` (and ``logs["clip_threshold"]`` with a
    policy) is set at each batch end, so it shows in the progress bar and in
    ``History``; at epoch end the last step's values are reported. ``records``,
    ``events``, ``state_dict()``, ``load_state_dict()`` and ``close()`` are the watch's.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.watch = Watch(Monitor(**options))
        self._last: StepRecord | None = None

    @property
    def monitor(self) -> Monitor:
        return self.watch.monitor

    # ------------------------------------------------------------------ fit hooks
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        capacity = int(getattr(model, "steps_per_execution", 1) or 1)
        # A train function cached by an earlier fit was traced without the wrapper.
        try:
            model.make_train_function(force=True)
        except Exception as exc:  # noqa: BLE001 - Keras retraces lazily anyway
            logger.error("gradwatch: could not reset Keras' train function: %r", exc)
        self.watch.attach(TFAttachment(model, None, self.monitor, mode="callback", capacity=capacity))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        att = self.watch.attachment
        if not isinstance(att, TFAttachment):
            return
        try:
            records = att.sync_records()
        except NonFiniteGradientError:
            self.watch.detach()
            raise
        if records:
            self._last = records[-1]
        self._fill_logs(logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._fill_logs(logs)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self.watch.detach()

    def _fill_logs(self, logs: dict[str, Any] | None) -> None:
        if logs is None or self._last is None:
            return
        logs["grad_norm"] = self._last.global_norm
        if self._last.clip is not None:
            logs["clip_threshold"] = self._last.clip.threshold

    # ------------------------------------------------------------------ like a Watch
    @property
    def records(self) -> list[StepRecord]:
        """Recent records, oldest first (pending device statistics are read first)."""
        return self.watch.records

    @property
    def events(self) -> list[GradEvent]:
        return self.watch.events

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON state, the same as a ``gradwatch.Watch``'s."""
        return self.watch.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also a ``gradwatch.Watch``'s, after JSON)."""
        self.watch.load_state_dict(state)

    def close(self) -> None:
        """Restore now (normally done at train end) and close the monitor's sinks."""
        self.watch.close()
