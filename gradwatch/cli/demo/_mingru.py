"""The demo's minGRU: a gated *diagonal* recurrence (Feng et al. 2024, "Were RNNs All We
Needed?"), written here so that ``gradwatch demo`` needs no package beyond torch, and
declared to gradwatch the way a user declares a layer of their own.

    z_t  = sigmoid(W_z x_t)              the update gate
    h~_t = W_h x_t                       the candidate (no dependence on h_{t-1})
    h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

The state Jacobian dh_t/dh_{t-1} is diag(1 - z_t): the gradient that reaches k steps back
is the product of the decays in between, which gradwatch reads exactly from
log(1 - z_t) = -softplus(W_z x_t) (:func:`mingru_decay`, declared with
:func:`gradwatch_torch.register_recurrence`). The layout follows ``mingru-pytorch``'s
``minGRU`` (one projection ``to_hidden_and_gate``, the candidate half first, the gate
half second), so gradwatch's minGRU remedies name the right parameters. The scan is a
plain loop over time: 100 steps of a (B, H) update, cheap at the demo's size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MinGRU", "declare", "mingru_decay"]


class MinGRU(nn.Module):
    """One minGRU layer, batch first: ``(B, T, input_size) -> (outputs (B, T, H), h_T (B, H))``."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.to_hidden_and_gate = nn.Linear(input_size, 2 * hidden_size)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cand, gate = self.to_hidden_and_gate(x).chunk(2, dim=-1)
        # per timestep, unbound once (slicing [:, t] inside the loop costs O(T^2) in backward)
        zc = (torch.sigmoid(gate) * cand).unbind(1)  # z_t * h~_t
        keep = torch.sigmoid(-gate).unbind(1)  # 1 - z_t, without the cancellation of 1 - sigmoid
        h = x.new_zeros(x.shape[0], self.hidden_size) if h0 is None else h0
        outs = []
        for t in range(x.shape[1]):
            h = torch.addcmul(zc[t], keep[t], h)  # (1 - z_t) * h_{t-1} + z_t * h~_t
            outs.append(h)
        return torch.stack(outs, dim=1), h


def mingru_decay(module: MinGRU, args: tuple, kwargs: dict, output: Any) -> Tensor:
    """log a_t = log(1 - z_t) = -softplus(W_z x_t), (B, T, H), from the layer's input."""
    x = args[0] if args else kwargs["x"]
    _, gate = module.to_hidden_and_gate(x).chunk(2, dim=-1)
    return -F.softplus(gate.float())


def declare() -> Any:
    """Declare :class:`MinGRU` to gradwatch (watches attached afterwards measure it);
    returns the declaration, for :func:`gradwatch_torch.recurrences.unregister_recurrence`."""
    import gradwatch_torch

    return gradwatch_torch.register_recurrence(MinGRU, decay=mingru_decay, kind="mingru", gate="update")
