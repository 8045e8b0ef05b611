"""``GradWatchCallback`` for Lightning: a thin adapter over :class:`gradwatch.Watch`.

```python
from gradwatch_torch.lightning import GradWatchCallback

trainer = L.Trainer(callbacks=[GradWatchCallback(policy="zclip")], gradient_clip_val=1.0)
trainer.fit(model, loader)          # every logger gets gradwatch/grad_norm, gradwatch/grad_norm/<layer>, ...
```

Where it measures, and why there. Lightning runs ``training_step`` and ``backward`` inside
a closure that the optimizer calls from ``optimizer.step(closure)``, so an optimizer step
pre-hook would run *before* this step's backward and read the previous gradient.
Lightning's ``on_before_optimizer_step`` runs right after the closure (and, with
``precision="16-mixed"``, after ``GradScaler.unscale_``) and before Lightning's own
``gradient_clip_val`` clipping: the gradient there is this step's, unscaled, unclipped.
The callback measures there, through a :class:`~gradwatch_torch.attach.TorchAttachment`
made without an optimizer (its ``step()`` is the measuring point), so the
records are those of ``gradwatch.watch``: pre-clip norms, per-timestep profiles of the
recurrent layers, alerts.

Clipping. A gradwatch ``policy`` multiplies the gradients in place at that point, so the
optimizer applies exactly the clip gradwatch decided. ``Trainer(gradient_clip_val=...)``
then clips what is left: both active means the tighter threshold wins every step (a
one-time warning says so); records show the pre-clip norm and gradwatch's own decision.
Your LightningModule's ``on_before_optimizer_step`` runs after this callback's and sees
the gradients after the policy.

The Lightning cases, one by one:

- *Gradient accumulation* (``accumulate_grad_batches=k``): Lightning calls the hook only
  on the batches that step, so one record per optimizer step, summing the k micro-batches.
- *Manual optimization*: each ``opt.step()`` calls the hook, so one record per
  ``opt.step()``, over the gradients present at that moment (after your
  ``manual_backward`` calls and anything you did to them, e.g. ``self.clip_gradients``).
  Several optimizers: each step records the whole module; a policy is refused then
  (it would clip one optimizer's gradients at another one's step).
- *Closures called more than once per step* (LBFGS, SAM-style optimizers): the first
  evaluation of each step is recorded; a policy with LBFGS is refused with a
  ``ConfigError`` at fit start (its line search re-evaluates the loss and gradient, which
  one clip decision cannot describe); with another such optimizer a policy clips the
  first evaluation only, and a warning says so once.
- *AMP*: ``bf16-mixed`` needs no scaler. With ``16-mixed`` the gradients are measured
  unscaled; the steps ``GradScaler`` skips (Inf/NaN after scaling, routine while it finds
  its scale) are neither recorded nor alerted on, as in a plain PyTorch loop. A fused
  optimizer unscales inside its own step, after the hook: gradwatch then sees scaled
  gradients, and says so once.
- *DDP*: the gradients are all-reduced before the hook, so every rank records the same
  numbers (profiles are combined across ranks) and only rank 0 writes to the sinks.
- *Checkpoints*: Lightning saves ``state_dict()`` with every checkpoint and calls
  ``load_state_dict`` on resume (``trainer.fit(..., ckpt_path=...)``): the step counter,
  the policy's state and the detectors' statistics continue exactly.

Loggers. At every recorded step the callback calls ``pl_module.log_dict`` with the keys
of :class:`~gradwatch_torch._trainers.TrainerMetrics` (``gradwatch/grad_norm``,
``gradwatch/grad_norm/<layer>``, ``gradwatch/clip_threshold``, ``gradwatch/clip_scale``,
``gradwatch/horizon/<layer>``, ...), as Lightning's own gradient-norm recipe does: the
logger writes them every ``log_every_n_steps`` (its own throttle), and
``trainer.callback_metrics`` has them at every step, also with ``logger=False``, so
``EarlyStopping(monitor="gradwatch/grad_norm")``, ``ModelCheckpoint`` and the progress
bar can use them. ``gradwatch/grad_norm_max`` and the propagation keys cover the steps
since the previous logger write. Each key logged through ``self.log`` costs about half a
millisecond, so per-layer keys by default only for models of at most 16 layers
(``log_layers=True`` / ``False`` to choose).

This module needs Lightning (``pip install 'gradwatch[lightning]'``), imported as
``lightning`` or ``pytorch_lightning``; ``gradwatch_torch`` itself never imports it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch

from gradwatch import Monitor, Watch
from gradwatch.errors import ConfigError, GradwatchError
from gradwatch.watch import WatchFront
from gradwatch_torch._trainers import NotKeras, THROUGH_TIME_KEYS, TrainerMetrics, clip_interaction, scaler_will_skip
from gradwatch_torch.attach import TorchAttachment

__all__ = ["GradWatchCallback"]

logger = logging.getLogger("gradwatch")

_WRONG_FRAMEWORK = (
    "gradwatch_torch.lightning.GradWatchCallback is a PyTorch Lightning callback (Trainer(callbacks=[...])); "
    "Keras' model.fit needs gradwatch_tf.GradWatchCallback: from gradwatch_tf import GradWatchCallback."
)


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` class: of the Lightning packages already imported (both
    ``lightning.pytorch`` and ``pytorch_lightning`` when both are), else of the first
    one installed.

    The two packages are copies with distinct ``Callback`` classes; inheriting from the
    one(s) the user's code imported keeps ``isinstance`` checks true without importing a
    second copy of Lightning (about a second). Lightning 2.x calls callbacks by duck
    typing, so the other package's ``Trainer`` accepts this callback too.
    """
    loaded = tuple(
        cls
        for cls in (
            getattr(sys.modules.get(name), "Callback", None) for name in ("lightning.pytorch", "pytorch_lightning")
        )
        if isinstance(cls, type)
    )
    if loaded:
        return loaded
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return (importlib.import_module(name).Callback,)
        except ImportError:
            continue
    raise ImportError(
        "gradwatch_torch.lightning needs Lightning; install it with pip install 'gradwatch[lightning]' "
        "(or pip install lightning). Without Lightning, use gradwatch.watch(model, optimizer)."
    )


class GradWatchCallback(NotKeras, WatchFront, *_callback_bases()):  # type: ignore[misc]
    """Watch the gradients of ``Trainer.fit`` (options as in ``gradwatch.watch``).

    Options are validated here (a bad one raises ``gradwatch.ConfigError`` before any
    training). ``log_layers``: the per-layer ``gradwatch/grad_norm/<layer>`` keys always
    (True), never (False), or when the model has at most 16 layers (None, the default). ``records``, ``events``, ``state_dict()``, ``load_state_dict()``
    and ``close()`` are the watch's (:attr:`watch`); records and state carry over from one
    ``fit`` to the next. See the module docstring for accumulation, manual optimization,
    AMP, DDP and how a policy combines with ``gradient_clip_val``.
    """

    _not_keras = _WRONG_FRAMEWORK  # what it says when handed to Keras' fit (NotKeras)

    def __init__(self, *, log_layers: bool | None = None, **options: Any) -> None:
        super().__init__()
        self.watch = Watch(Monitor(**options))
        self._options = dict(options)
        self._metrics = TrainerMetrics(layers=log_layers)
        self._scaler: Any = None
        self._measured_at: int | None = None  # trainer.global_step of the last record
        self._log_failed = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ fit hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Refuse, before the first step, what a policy cannot do right here."""
        policy = self.monitor.policy
        if policy is None:
            return
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        for opt in optimizers:
            if isinstance(opt, torch.optim.LBFGS):
                raise ConfigError(
                    f"GradWatchCallback(policy={policy.name!r}) cannot clip for torch.optim.LBFGS: its line search "
                    "evaluates the loss and gradient several times per step, and one clip decision per step would "
                    "leave the other evaluations unclipped. Use policy=None (gradwatch then records the first "
                    "evaluation of every step) or a first-order optimizer.",
                    option="policy",
                    value=policy.name,
                )
        if len(optimizers) > 1:
            raise ConfigError(
                f"GradWatchCallback(policy={policy.name!r}) cannot clip with {len(optimizers)} optimizers: gradwatch "
                "measures the whole LightningModule at each optimizer's step, so a clip would also scale the gradients "
                "of the other optimizers' parameters. Use policy=None here (one record per opt.step()), and clip in "
                "training_step with self.clip_gradients(opt, ...) where you need it.",
                option="policy",
                value=policy.name,
            )
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val and "clip" not in self._warned:
            self._warned.add("clip")
            algo = getattr(getattr(trainer, "gradient_clip_algorithm", None), "value", None) or "norm"
            logger.warning(
                clip_interaction(policy.name, f"gradient_clip_val={clip_val} ({algo})", "gradient_clip_val=None")
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach (every hook is installed now and removed at train end)."""
        self._scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._measured_at = None
        fused = [
            type(o).__name__
            for o in getattr(trainer, "optimizers", None) or []
            if getattr(o, "_step_supports_amp_scaling", False)
        ]
        if self._scaler is not None and fused and "fused" not in self._warned:
            self._warned.add("fused")
            logger.warning(
                "gradwatch: %s unscales the gradients inside its own step (a fused optimizer), so under precision="
                "'16-mixed' gradwatch sees them still multiplied by the GradScaler's scale: norms and a policy's "
                "threshold are off by that factor. Use a non-fused optimizer or bf16-mixed to watch this run.",
                fused[0],
            )
        self.watch.attach(TorchAttachment(pl_module, None, self.monitor))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The measuring point: after backward and unscaling, before Lightning's clipping."""
        if self.watch.attachment is None:
            return
        step = int(trainer.global_step)
        if step == self._measured_at:  # the closure evaluated again within one optimizer step (LBFGS, SAM)
            if self.monitor.policy is not None and "again" not in self._warned:
                self._warned.add("again")
                logger.warning(
                    "gradwatch: %s evaluated its closure more than once in step %d; gradwatch recorded and clipped "
                    "(policy %r) the first evaluation only, and the later ones, which such an optimizer may apply, "
                    "are not clipped. Use policy=None with this optimizer, or clip in its closure.",
                    type(optimizer).__name__,
                    self.monitor.step_count,
                    self.monitor.policy.name,
                )
            return
        if scaler_will_skip(self._scaler, optimizer):
            return
        record = self.watch.step()
        if record is None:
            return
        self._measured_at = step
        self._metrics.update(record)
        self._log(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Detach (the model is exactly as before) and bring the run file up to date."""
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.watch.attachment is None:
            return
        try:
            self.watch.detach()
        finally:
            if not self.watch.closed:
                self.monitor.flush()

    def _log(self, trainer: Any, pl_module: Any) -> None:
        """``pl_module.log_dict`` at every recorded step, as Lightning's own recipe for
        gradient norms does: ``trainer.callback_metrics`` (``EarlyStopping``,
        ``ModelCheckpoint(monitor="gradwatch/...")``, the progress bar) has the keys even
        with ``logger=False`` or before ``log_every_n_steps``, and the logger throttles
        what it writes. The window keys (``grad_norm_max``, ``clipped_steps``) start afresh
        on the steps Lightning writes its logs.

        The propagation keys are the exception: Lightning's logger writes every key logged
        earlier in the epoch again at each write, so a rate measured at step 1 would reach
        the logger at every write of the epoch. They go to ``callback_metrics`` only
        (``logger=False``: the latest measurement, which is what a monitor reads there),
        and to the loggers directly, on a write step whose window measured them (as
        Lightning's ``LearningRateMonitor`` writes its own keys). A logging failure is
        reported once and never stops training."""
        if self._log_failed:
            return
        connector = getattr(trainer, "_logger_connector", None)
        writes = connector is None or bool(getattr(connector, "should_update_logs", True))
        loggers = list(getattr(trainer, "loggers", None) or [])
        try:
            metrics = self._metrics.metrics(new_window=writes)
            through_time = {k: v for k, v in metrics.items() if k.startswith(THROUGH_TIME_KEYS)}
            plain = {k: v for k, v in metrics.items() if k not in through_time}
            # no logger: callback_metrics only (and no Lightning warning per key)
            pl_module.log_dict(plain, on_step=True, on_epoch=False, prog_bar=False, logger=bool(loggers))
            if through_time:
                pl_module.log_dict(through_time, on_step=True, on_epoch=False, prog_bar=False, logger=False)
                if writes and loggers:
                    step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
                    for lg in loggers:
                        lg.log_metrics(through_time, step=trainer.global_step if step is None else step)
        except Exception as exc:  # noqa: BLE001 - logging must never break training
            self._log_failed = True
            logger.error(
                "gradwatch: logging to Lightning's loggers failed (%s: %s); records and sinks go on.",
                type(exc).__name__,
                exc,
            )

    # ------------------------------------------------------------------ like a Watch
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (Lightning calls this on ``fit(ckpt_path=...)``)."""
        if not state_dict:
            return
        if self.watch.closed:
            raise GradwatchError("This GradWatchCallback is closed; create a new one to resume.")
        self.watch.load_state_dict(state_dict)

    def close(self) -> None:
        """Detach now (normally done at train end) and close the monitor's sinks."""
        self.watch.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its options and the watch's state (``strategy="ddp_spawn"`` sends the
        Trainer and its callbacks to each new process): every process builds its own watch,
        hooks and sinks, and only rank 0 writes. The records then live in those processes,
        not in this object."""
        return {
            "options": self._options,
            "log_layers": self._metrics.layers,
            "state": self.watch.state_dict() if self.monitor.step_count else None,
        }

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(log_layers=state["log_layers"], **state["options"])  # type: ignore[misc]
        if state.get("state") is not None:
            self.watch.load_state_dict(state["state"])
