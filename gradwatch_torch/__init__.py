"""gradwatch for PyTorch: watch gradients of any ``nn.Module`` while it trains.

``gradwatch_torch.watch(model, optimizer, **options)`` is ``gradwatch.watch`` without the
backend dispatch. What the backend does, and where its limits are:

- It measures inside ``optimizer.step()`` (a step pre-hook), so only real optimizer steps
  count (micro-batches of gradient accumulation do not). Without an optimizer, call
  ``watch.step()`` after ``backward()`` and before ``optimizer.step()``.
- Cost per step: the norms in a few fused operations per (device, dtype) group of
  gradients; one device-to-host copy on profiled and flush steps only (quiet steps read
  nothing; see the README's Options). fp16/bf16 gradients are reduced in float32.
- Policies multiply the gradients in place by the decided scale (AGC: per unit, on
  device). With ``policy=None`` nothing touches the gradients.
- ``on_nonfinite="skip"`` sets every gradient to None, which makes the optimizer step a
  no-op (weights and optimizer state unchanged); ``"raise"`` raises before any change.
- ``torch.amp.GradScaler``: ``scaler.step`` unscales before ``optimizer.step()``, so
  gradwatch sees unscaled gradients. Steps the scaler skips (Inf/NaN in the scaled
  gradients) never reach ``optimizer.step()``: gradwatch neither sees nor counts them.
- Every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.*Cell`` is probed on profiled steps
  (``profile_every``): per-timestep norms of the input gradient (sensitivity), spectral
  norms of the recurrent weights per gate (within 1% of an SVD), and propagation through
  every layer and direction (the product of the state Jacobians) with the forget / update
  gate statistics, both from a replay of the first 8 sequences of the batch through the
  layer's own weights, checked against the layer's output. The replay runs with one
  intra-op thread, within 5% of the profiled steps' time (on every n-th profiled step for
  large stacked layers). A cell loop is one recurrence when each call's state is the
  previous call's output. Copies of a watched model (deepcopy, pickle, ``torch.save``,
  ``AveragedModel``) carry inert hooks only; under ``torch.autocast`` every measurement
  goes on (the replay runs in float32).
- DDP: names come from the wrapped module; every rank records the same numbers (profiles,
  propagation and gate statistics are combined across ranks); only rank 0 writes unless
  ``all_ranks=True``. FSDP2 ``fully_shard`` on a 1-D mesh: the shards' squared norms are
  all-reduced (one small all-reduce per step); FSDP1, HSDP/TP layouts and AGC with
  sharding raise a clear ``GradwatchError``.
- ``torch.compile``: recurrent modules graph-break, so the probes run eagerly and the
  names are those of the original module. Activation checkpointing (reentrant or not) is
  supported; with reentrant checkpointing and several segments of RNN *cells*, the cell
  timesteps are in recomputation order.
- ``optimizer.step(closure)``: gradwatch measures, clips and checks right after the
  closure's first evaluation inside ``step()``, so the record is that step's gradient.
  LBFGS gets one record and one profile per step; a clipping policy with LBFGS is refused
  at ``watch()`` (its line search uses every evaluation's gradient).
- The parameter set is followed as it changes: ``optimizer.add_param_group``, a submodule
  registered on the model, unfreezing. Frozen parameters and those without a gradient this
  step are absent from the record (not 0). Detecting a change costs about a microsecond
  per step (a flag set by ``torch.nn``'s registration hooks and the optimizer's group
  sizes), plus one ``requires_grad`` read per parameter. A recurrent layer added after
  ``watch()`` is measured but not profiled (the probes are installed at ``watch()``).
- Every dtype ``clip_grad_norm_`` takes: complex gradients have real norms, fp16/bf16 are
  reduced in float32.
- Trainers: ``gradwatch_torch.lightning.GradWatchCallback`` (Lightning) and
  ``gradwatch_torch.transformers.GradWatchCallback`` (Hugging Face ``Trainer``) measure
  the pre-clip gradient where each trainer allows it and log ``gradwatch/...`` keys to its
  loggers; this package imports neither trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from gradwatch import Watch

__all__ = ["register_recurrence", "watch"]


def register_recurrence(module_type: Any, **how: Any) -> Any:
    """Declare a recurrent module type gradwatch does not know: ``decay=fn`` for a
    diagonal / gated linear recurrence (``fn(module, args, kwargs, output) -> log_a``,
    (B, T, ...)), or ``step=True`` for a cell called in a loop; ``kind=`` and ``gate=``
    name it in records and alerts. See :mod:`gradwatch_torch.recurrences`."""
    from gradwatch_torch.recurrences import register_recurrence as register

    return register(module_type, **how)


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, **options: Any) -> Watch:
    """Watch ``model``'s gradients; with ``optimizer``, inside every ``optimizer.step()``.

    Without ``optimizer`` call ``watch.step()`` after ``backward()`` and before
    ``optimizer.step()``. Options are those of ``gradwatch.watch`` (validated first, so
    a bad option raises ``gradwatch.ConfigError`` before any hook is installed).
    """
    from gradwatch import watch_with
    from gradwatch_torch.attach import attach

    return watch_with(lambda monitor: attach(model, optimizer, monitor), model, **options)
