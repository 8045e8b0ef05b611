"""The through-time engine: one home for what gradwatch knows about recurrences.

* :mod:`~gradwatch.through_time.plan` — which sequences are probed, exact vs estimated,
  the probe vectors, when a replay runs (the cost model), the probe seeds;
* :mod:`~gradwatch.through_time.fit` — rate and horizon, and the aggregate over probed
  sequences (median of the RMS gain, max of the largest singular value);
* :mod:`~gradwatch.through_time.diagonal` — diagonal / gated linear recurrences (minGRU,
  Mamba, xLSTM's forget path, RG-LRU), exact from their decays;
* :mod:`~gradwatch.through_time.judge` — vanishing and exploding through time, with
  remedies that fit the layer and what the model already has;
* :mod:`~gradwatch.through_time.reference` — the float64 reference every backend is
  tested against;
* :mod:`~gradwatch.through_time.spectral` — the largest singular value of recurrent gate
  blocks on the host (Keras on JAX and torch), tracked across profiled steps.

Backends keep only their kernels: how each step's Jacobian acts, from the layer's own
weights and the activations of its forward pass (``gradwatch_torch._replay``,
``gradwatch_tf._kreplay``), and the :class:`~gradwatch.through_time.ops.TensorOps` of
their framework, with which the shared rules here run on the device.
"""

from __future__ import annotations

from gradwatch.through_time.diagonal import diagonal_logs, diagonal_propagation
from gradwatch.through_time.fit import HORIZON_FRACTION, aggregate, horizon, rate
from gradwatch.through_time.ops import NUMPY_TENSORS, TensorOps
from gradwatch.through_time.plan import EXACT_DIM, PROBED, replay_every, seed_for

__all__ = [
    "EXACT_DIM",
    "HORIZON_FRACTION",
    "NUMPY_TENSORS",
    "PROBED",
    "TensorOps",
    "aggregate",
    "diagonal_logs",
    "diagonal_propagation",
    "horizon",
    "rate",
    "replay_every",
    "seed_for",
]
