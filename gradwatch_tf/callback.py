"""``GradWatchCallback``: gradwatch for ``model.fit``.

Keras' ``fit`` owns the training loop, so there is no place for a hook around
``optimizer.apply`` other than the optimizer itself: at train begin the callback wraps
``apply`` on the optimizer instance (see :mod:`gradwatch_tf.attach`), and at train end
it deletes that instance attribute again, so the optimizer and the model are exactly as
they were. The gradients are measured and clipped inside the traced step; the callback
only reads the per-step ring buffer once per batch end and hands the rows to the core.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras

from gradwatch.errors import ConfigError, NonFiniteGradientError
from gradwatch.events import GradEvent
from gradwatch.monitor import Monitor
from gradwatch.records import StepRecord
from gradwatch.watch import STATE_VERSION
from gradwatch_tf.attach import TFAttachment

logger = logging.getLogger("gradwatch")

__all__ = ["GradWatchCallback"]


class GradWatchCallback(keras.callbacks.Callback):
    """Watch the gradients of ``model.fit`` (options as in ``gradwatch.watch``).

    The options are validated here (a bad one raises ``gradwatch.ConfigError`` before
    training starts). ``logs["grad_norm"]`` (and ``logs["clip_threshold"]`` with a
    policy) is set at each batch end, so it shows in the progress bar and in
    ``History``; at epoch end the last step's values are reported.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.monitor = Monitor(**options)
        self._attachment: TFAttachment | None = None
        self._backend_state: dict[str, Any] = {}
        self._last: StepRecord | None = None

    # ------------------------------------------------------------------ fit hooks
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        capacity = int(getattr(model, "steps_per_execution", 1) or 1)
        # A train function cached by an earlier fit was traced without the wrapper.
        try:
            model.make_train_function(force=True)
        except Exception as exc:  # noqa: BLE001
            logger.error("gradwatch: could not reset Keras' train function: %r", exc)
        self._attachment = TFAttachment(model, None, self.monitor, mode="callback", capacity=capacity)
        if self._backend_state:
            self._attachment.load_state_dict(self._backend_state)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._attachment is None:
            return
        try:
            records = self._attachment.sync_records()
        except NonFiniteGradientError:
            self._detach()
            raise
        if records:
            self._last = records[-1]
        self._fill_logs(logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._fill_logs(logs)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._detach()

    # ------------------------------------------------------------------ helpers
    def _fill_logs(self, logs: dict[str, Any] | None) -> None:
        if logs is None or self._last is None:
            return
        logs["grad_norm"] = self._last.global_norm
        if self.monitor.policy is not None and self._last.clip is not None:
            logs["clip_threshold"] = self._last.clip.threshold

    def _detach(self) -> None:
        att, self._attachment = self._attachment, None
        if att is None:
            return
        try:
            self._backend_state = att.state_dict()
        except Exception as exc:  # noqa: BLE001
            logger.error("gradwatch: saving the in-graph state failed: %r", exc)
        att.close()

    # ------------------------------------------------------------------ like a Watch
    @property
    def records(self) -> list[StepRecord]:
        """Recent records, oldest first (pending device statistics are read first)."""
        if self._attachment is not None:
            self._attachment.sync()
        return self.monitor.records

    @property
    def events(self) -> list[GradEvent]:
        if self._attachment is not None:
            self._attachment.sync()
        return self.monitor.events

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON state: the core monitor's and the in-graph policy state."""
        if self._attachment is not None:
            self._attachment.sync()
            self._backend_state = self._attachment.state_dict()
        elif self._backend_state.get("policy") is not None and self.monitor.policy is not None:
            self.monitor.policy.load_state_dict(self._backend_state["policy"])
        return {"version": STATE_VERSION, "monitor": self.monitor.state_dict(), "backend": dict(self._backend_state)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also a ``gradwatch.Watch``'s, after JSON)."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"gradwatch state version {state.get('version')!r} is not supported (expected {STATE_VERSION}).",
                option="state",
                value=state.get("version"),
            )
        self.monitor.load_state_dict(state["monitor"])
        self._backend_state = dict(state.get("backend") or {})
        if self._attachment is not None:
            self._attachment.load_state_dict(self._backend_state)

    def close(self) -> None:
        """Restore now (normally done at train end) and close the monitor's sinks."""
        self._detach()
        close = getattr(self.monitor, "close", None)
        if callable(close):
            close()
