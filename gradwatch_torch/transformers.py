"""``GradWatchCallback`` for the Hugging Face ``Trainer``: a thin adapter over :class:`gradwatch.Watch`.

```python
from gradwatch_torch.transformers import GradWatchCallback

trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradWatchCallback(profile_every=10)])
trainer.train()        # logs (and every report_to tracker) get gradwatch/grad_norm, gradwatch/grad_norm/<layer>, ...
```

Where it measures, and why there. At every optimizer step the Trainer does, in this order:
``max_grad_norm`` clipping (which also computes the ``grad_norm`` it logs, pre-clip), the
``on_pre_optimizer_step`` callbacks, ``optimizer.step()``. A callback (or an optimizer
step pre-hook) therefore only ever sees clipped gradients. So, while a step runs (from
``on_step_begin`` to ``on_step_end``), the callback holds the Trainer's clipping: it sets
``args.max_grad_norm`` to 0 on that ``TrainingArguments`` object (the Trainer then
computes its ``grad_norm`` without clipping, on the same gradients), measures in
``on_pre_optimizer_step`` through a :class:`~gradwatch_torch.attach.TorchAttachment` made
without an optimizer, and then clips exactly as the Trainer would have
(``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)``, which is what
Accelerate runs for a single process and DDP). The value is back in ``args`` at
``on_step_end``, before any checkpoint saves ``training_args.bin``, and at
``on_train_end`` / ``close()``. Nothing else is changed: no function is replaced, and
with no policy the weights are bitwise those of a run without the callback. So:

- every record's ``global_norm`` equals the ``grad_norm`` the Trainer logs for that step
  (both pre-clip, on the same gradients);
- ``policy`` and ``max_grad_norm`` both clip: gradwatch's policy first (on the pre-clip
  gradient), then the Trainer's ``max_grad_norm`` cap on what is left, so every step the
  tighter threshold wins (a one-time warning says so when both are on).
  ``TrainingArguments`` defaults to ``max_grad_norm=1.0``; pass ``max_grad_norm=0`` to
  let the policy alone decide.

Where that is not possible (FSDP, XLA and sharded tensor-parallel gradients clip inside
their engines; transformers < 5 computes ``grad_norm`` only while it clips), the callback
leaves ``max_grad_norm`` alone, warns once, and records what it sees after the Trainer's
clipping; DeepSpeed keeps no ``p.grad`` at all and is refused.

Logs. The Trainer logs every ``logging_steps``; the callback merges its numbers into that
same dict under ``gradwatch/...`` keys (:class:`~gradwatch_torch._trainers.TrainerMetrics`:
``gradwatch/grad_norm``, ``gradwatch/grad_norm_max`` over the window,
``gradwatch/grad_norm/<layer>``, ``gradwatch/clip_threshold``, ``gradwatch/horizon/<layer>``,
...) and into ``trainer.state.log_history``. The ``report_to`` trackers and the console
printer read that dict in callback order, so at train begin the callback moves itself,
in the Trainer's callback list, to just after ``DefaultFlowCallback``.

Accumulation: one record per optimizer step. Mixed precision: bf16 has no scaler; with
fp16 the gradients are measured unscaled and the steps ``GradScaler`` skips are not
recorded (as in a plain PyTorch loop). ``on_nonfinite="skip"`` drops the gradients so the
optimizer step is a no-op (the learning-rate schedule still advances, as it does when
the scaler skips). Checkpoints: the watch's state goes into ``trainer_state.json``
(``stateful_callbacks["gradwatch"]``) with every checkpoint and is loaded on
``trainer.train(resume_from_checkpoint=...)``, so the step counter, the policy and the
detectors continue exactly.

This module needs ``transformers`` (``pip install 'gradwatch[transformers]'``);
``gradwatch_torch`` itself never imports it.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers import __version__ as transformers_version
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "gradwatch_torch.transformers needs Hugging Face transformers; install it with "
        "pip install 'gradwatch[transformers]'. Without the Trainer, use gradwatch.watch(model, optimizer)."
    ) from exc

from gradwatch import Monitor, Watch
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.watch import WatchFront
from gradwatch_torch._distributed import is_dtensor
from gradwatch_torch._trainers import NotKeras, TrainerMetrics, clip_interaction, scaler_will_skip
from gradwatch_torch.attach import TorchAttachment

__all__ = ["STATE_KEY", "GradWatchCallback"]

logger = logging.getLogger("gradwatch")

#: Key of the watch's state in ``TrainerState.stateful_callbacks`` (trainer_state.json).
#: Not the class name on purpose: the Trainer's ``restore_callback_states_from_checkpoint``
#: would otherwise replace this callback by a new instance built without its options.
STATE_KEY = "gradwatch"

#: While the callback holds ``max_grad_norm``, the user's value is also kept on the
#: TrainingArguments object itself, so that a train() that raised mid-step leaves a way
#: back for the next callback that sees these args.
_HELD = "_gradwatch_held_max_grad_norm"


def _release_args(args: Any) -> None:
    """Give ``args`` its ``max_grad_norm`` back if a callback holds it."""
    held = getattr(args, "__dict__", {}).pop(_HELD, None)
    if held is not None:
        args.max_grad_norm = held


def _cannot_hold(args: Any, model: Any) -> str | None:
    """Why the Trainer's clipping cannot be held and reproduced here (None when it can)."""
    if not hasattr(Trainer, "_get_grad_norm"):
        # transformers < 5 computes (and unscales, and logs) grad_norm only while it clips.
        return f"transformers {transformers_version} computes grad_norm only while clipping"
    if getattr(args, "fsdp", None):
        return "FSDP clips inside its engine"
    try:
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        kind = str(getattr(state.get("distributed_type"), "value", state.get("distributed_type")) or "")
    except Exception:  # noqa: BLE001 - accelerate internals changed: rely on args alone
        kind = ""
    if kind in ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM"):
        return f"{kind} clips inside its engine"
    if any(is_dtensor(p) for p in model.parameters()):
        return "sharded (DTensor) gradients are clipped per device mesh"
    return None


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (the key of the
    scaler's per-optimizer state)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


_WRONG_FRAMEWORK = (
    "gradwatch_torch.transformers.GradWatchCallback is a Hugging Face Trainer callback (Trainer(callbacks=[...])); "
    "Keras' model.fit needs gradwatch_tf.GradWatchCallback: from gradwatch_tf import GradWatchCallback."
)


class GradWatchCallback(NotKeras, WatchFront, TrainerCallback):
    """Watch the gradients of ``Trainer.train`` (options as in ``gradwatch.watch``).

    Options are validated here (a bad one raises ``gradwatch.ConfigError`` before any
    training). ``log_layers``: the per-layer ``gradwatch/grad_norm/<layer>`` keys always
    (True), never (False), or when the model has at most 16 layers (None, the default: a
    transformer's hundreds of layers would flood the printed log line and the trackers).
    ``records``, ``events``, ``state_dict()``, ``load_state_dict()`` and ``close()`` are
    the watch's (:attr:`watch`).

    How a gradwatch ``policy`` and the Trainer's ``max_grad_norm`` interact: records show
    the gradient before both; the policy clips first, then ``max_grad_norm`` caps what is
    left, so the tighter threshold wins each step (a warning says so once). With
    ``policy=None`` gradwatch only measures, and the Trainer clips as it always does. See
    the module docstring for how the pre-clip gradient is reached.
    """

    _not_keras = _WRONG_FRAMEWORK  # what it says when handed to Keras' fit (NotKeras)

    def __init__(self, *, log_layers: bool | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = Watch(Monitor(**options))
        self._metrics = TrainerMetrics(layers=log_layers)
        self._max_grad_norm = 0.0  # the user's max_grad_norm, applied by this callback
        self._take_over = False
        self._held_args: Any = None  # the TrainingArguments whose max_grad_norm is held now
        self._scaler: Any = None
        self._inner_optimizer: Any = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        """Attach, load the state a resumed run saved, decide whether to hold the clipping."""
        self._release()
        _release_args(args)  # a previous train() raised while a callback held the clipping
        if not self._run_before_loggers():
            self._warn_once(
                "order",
                "gradwatch: could not find the Trainer's callback list to run before the report_to loggers; the "
                "gradwatch/... keys reach trainer.state.log_history and the callbacks after this one only.",
            )
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY)
        if saved and getattr(state, "global_step", 0) > 0:
            self.watch.load_state_dict(saved)
        if model is None:
            raise GradwatchError(
                "GradWatchCallback: the Trainer passed no model to on_train_begin; there is nothing to watch."
            )
        if getattr(args, "deepspeed", None):
            raise GradwatchError(
                "GradWatchCallback does not support DeepSpeed: its engine keeps the gradients out of p.grad and clips "
                "them itself, so gradwatch has nothing to measure. Train without DeepSpeed, or use DeepSpeed's own "
                "gradient-norm logging."
            )
        self._max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        why = _cannot_hold(args, model) if self._max_grad_norm > 0 else None
        self._take_over = self._max_grad_norm > 0 and why is None
        if why is not None:
            self._warn_once(
                "engine",
                f"gradwatch: {why}, so gradwatch sees the gradients after the Trainer's max_grad_norm={self._max_grad_norm} "
                "clipping: records and gradwatch/grad_norm are post-clip norms. Pass max_grad_norm=0 (and a gradwatch "
                "policy if you want clipping) to see them before clipping.",
            )
        policy = self.monitor.policy
        if policy is not None and self._max_grad_norm > 0:
            self._warn_once(
                "clip",
                clip_interaction(
                    policy.name, f"max_grad_norm={self._max_grad_norm}", "TrainingArguments(max_grad_norm=0)"
                ),
            )
        self._scaler = getattr(optimizer, "scaler", None)
        self._inner_optimizer = _unwrap_optimizer(optimizer)
        self.watch.attach(TorchAttachment(model, None, self.monitor))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hold the Trainer's clipping for this step (see the module docstring)."""
        if self._take_over and self.watch.attachment is not None and self._held_args is None:
            args.__dict__[_HELD] = self._max_grad_norm
            args.max_grad_norm = 0.0
            self._held_args = args

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """The measuring point: the gradients are unscaled and, while held, unclipped."""
        if self.watch.attachment is None:
            return
        if scaler_will_skip(self._scaler, self._inner_optimizer):
            return  # the scaler skips optimizer.step(); nothing to record or clip
        try:
            record = self.watch.step()
        except NonFiniteGradientError:
            self._release()
            self.watch.detach()
            raise
        self._metrics.update(record)
        if self._held_args is not None and model is not None and not (record is not None and record.skipped):
            # Exactly the Trainer's own clipping (Accelerate: torch's clip_grad_norm_ on model.parameters()).
            torch.nn.utils.clip_grad_norm_(model.parameters(), self._max_grad_norm)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Give ``max_grad_norm`` back; put the watch's state where a checkpoint saved now finds it."""
        self._release()
        if control.should_save or control.should_evaluate:
            self._save_state(state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save or control.should_evaluate:
            self._save_state(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Merge the ``gradwatch/...`` numbers into a training log (not evaluation or summary logs)."""
        if logs is None or "loss" not in logs or self._metrics.last is None:
            return
        metrics = self._metrics.metrics()
        logs.update(metrics)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(metrics)  # the Trainer appended a copy of logs before calling on_log

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Give everything back (the model, ``args``) and bring the run file up to date."""
        self._release()
        if self.watch.attachment is not None:
            try:
                self.watch.detach()
            finally:
                if not self.watch.closed:
                    self.monitor.flush()

    # ------------------------------------------------------------------ internals
    def _release(self) -> None:
        args, self._held_args = self._held_args, None
        if args is not None:
            _release_args(args)

    def _save_state(self, state: Any) -> None:
        callbacks = getattr(state, "stateful_callbacks", None)
        if isinstance(callbacks, dict):
            callbacks[STATE_KEY] = self.watch.state_dict()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _run_before_loggers(self) -> bool:
        """Move this callback to just after ``DefaultFlowCallback`` in the Trainer's list.

        The Trainer builds its log dict, appends a copy to ``log_history`` and hands the
        dict to ``on_log`` of each callback in list order; the ``report_to`` trackers and
        the printer come before callbacks passed by the user, so they would write before
        this one added its keys. The list is found in the caller's frame
        (``CallbackHandler.call_event``), which is iterating it right now: moving this
        callback from index i to an index <= i leaves the callbacks after it at the same
        indices, so the iteration goes on without skipping or repeating one.
        """
        frame: FrameType | None = sys._getframe(1)
        handler = None
        for _ in range(8):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler):
                handler = candidate
                break
            frame = frame.f_back
        if handler is None:
            return False
        callbacks = handler.callbacks
        mine = [i for i, cb in enumerate(callbacks) if cb is self]
        if not mine:
            return False
        i = mine[0]
        target = 0
        for k in range(i):
            if isinstance(callbacks[k], DefaultFlowCallback):
                target = k + 1
        if target < i:
            del callbacks[i]
            callbacks.insert(target, self)
        return True

    # ------------------------------------------------------------------ like a Watch
    def close(self) -> None:
        """Give everything back now (normally done at train end) and close the sinks."""
        self._release()
        self.watch.close()
