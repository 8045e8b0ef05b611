"""gradwatch for PyTorch: watch gradients of any ``nn.Module`` while it trains.

``gradwatch_torch.watch(model, optimizer, **options)`` is ``gradwatch.watch`` without the
backend dispatch. What the backend does, and where its limits are:

- It measures inside ``optimizer.step()`` (a step pre-hook), so only real optimizer steps
  count (micro-batches of gradient accumulation do not). Without an optimizer, call
  ``watch.step()`` after ``backward()`` and before ``optimizer.step()``.
- Cost per step: one ``torch._foreach_norm`` per (device, dtype) group of gradients and one
  device-to-host copy of everything measured. fp16/bf16 gradients are reduced in float32.
- Policies multiply the gradients in place by the decided scale (AGC: per unit, on
  device). With ``policy=None`` nothing touches the gradients.
- ``on_nonfinite="skip"`` sets every gradient to None, which makes the optimizer step a
  no-op (weights and optimizer state unchanged); ``"raise"`` raises before any change.
- ``torch.amp.GradScaler``: ``scaler.step`` unscales before ``optimizer.step()``, so
  gradwatch sees unscaled gradients. Steps the scaler skips (Inf/NaN in the scaled
  gradients) never reach ``optimizer.step()``: gradwatch neither sees nor counts them.
- Every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.*Cell`` is probed on profiled steps
  (``profile_every``): per-timestep norms of the input gradient, spectral norms of the
  recurrent weights per gate, and for single-layer LSTM / GRU the forget / update gate
  statistics (recomputed on the first 4 sequences of the batch).
- DDP: names come from the wrapped module; every rank records the same numbers (profiles
  and gate statistics are combined across ranks); only rank 0 writes unless
  ``all_ranks=True``. FSDP2 ``fully_shard`` on a 1-D mesh: the shards' squared norms are
  all-reduced (one small all-reduce per step); FSDP1, HSDP/TP layouts and AGC with
  sharding raise a clear ``GradwatchError``.
- ``torch.compile``: recurrent modules graph-break, so the probes run eagerly and the
  names are those of the original module. Activation checkpointing (reentrant or not) is
  supported; with reentrant checkpointing and several segments of RNN *cells*, the cell
  timesteps are in recomputation order.
- Not supported: optimizers that call a closure inside ``step()`` (LBFGS: the pre-hook
  runs before the closure's backward); parameters added or unfrozen after ``watch()``
  are not measured (watch again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from gradwatch import Watch

__all__ = ["watch"]


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, **options: Any) -> Watch:
    """Watch ``model``'s gradients; with ``optimizer``, inside every ``optimizer.step()``.

    Without ``optimizer`` call ``watch.step()`` after ``backward()`` and before
    ``optimizer.step()``. Options are those of ``gradwatch.watch`` (validated first, so
    a bad option raises ``gradwatch.ConfigError`` before any hook is installed).
    """
    from gradwatch import watch_with
    from gradwatch_torch.attach import attach

    return watch_with(lambda monitor: attach(model, optimizer, monitor), model, **options)
