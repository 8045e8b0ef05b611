"""LSTM forget-gate and GRU update-gate statistics, from the propagation replay.

The replay (:mod:`gradwatch_torch._replay`) recomputes every gate of every recurrence of
a layer on the probed sequences (the first ``min(B, 8)`` of the batch), from the user's
initial state, with each layer's real input (dropout included): the gate statistics
come from those values, for every layer of a stack and both directions, at no extra
cost. The gate that carries the state is the LSTM's forget gate ``f_t`` (the cell state's
gradient is multiplied by it at every step) and the GRU's update gate ``z_t``
(``h_t = (1 - z_t) n_t + z_t h_{t-1}``), so ``sum_t log gate_t`` is the log gain of that
memory path over the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["gate_statistics", "module_gates"]


def gate_statistics(log_gate: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mean gate, mean over sequences and units of sum_t log gate) of one recurrence.

    ``log_gate`` is (T, P, H), the log of the gate (``logsigmoid`` of its pre-activation,
    exact where the gate is tiny); ``valid`` (T, P) excludes padded steps, so each
    sequence sums over its own length. float64 (float32 on MPS).
    """
    lg = log_gate.to(torch.float32 if log_gate.device.type == "mps" else torch.float64)
    if valid is None:
        return lg.exp().mean(), lg.sum(dim=0).mean()
    v = valid.reshape(valid.shape[0], valid.shape[1], 1)
    count = v.sum() * lg.shape[-1]
    return torch.where(v, lg.exp(), 0.0).sum() / count, torch.where(v, lg, 0.0).sum(dim=0).mean()


class _Gated(Protocol):
    gate_mean: Tensor | None
    gate_path: Tensor | None


def module_gates(results: Sequence[_Gated]) -> Tensor | None:
    """One layer's [mean gate, log path gain]: those of its recurrence whose memory path
    closes most (lowest log path gain), the one a vanishing alert is about; None for a
    layer without such a gate (plain RNN). Chosen on the device (no host sync)."""
    gated = [r for r in results if r.gate_mean is not None and r.gate_path is not None]
    if not gated:
        return None
    paths = torch.stack([r.gate_path for r in gated])  # type: ignore[misc]
    means = torch.stack([r.gate_mean for r in gated])  # type: ignore[misc]
    k = torch.argmin(paths)
    return torch.stack([means[k], paths[k]])
