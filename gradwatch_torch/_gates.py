"""LSTM forget-gate and GRU update-gate statistics, recomputed from a layer's input and output.

Runs under ``no_grad`` in a forward hook on profiled steps, on a few sequences of the
batch, so only two numbers per layer are kept until the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lstm_forget_stats", "packed_lstm_forget_stats"]


@torch.no_grad()
def lstm_forget_stats(
    x: Tensor,
    out: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    batch_first: bool,
    n_gates: int = 4,
    max_batch: int | None = None,
) -> Tensor:
    """Forget-gate statistics of a single-layer LSTM's forward direction, recomputed.

    ``f_t = sigmoid(x_t W_if^T + h_{t-1} W_hf^T + b_if + b_hf)`` with ``h_{t-1}`` the
    layer's output one step earlier (``h0`` at t = 0). Gate order in PyTorch is
    i, f, g, o, so the forget rows are the second quarter of the stacked weights.
    The cell state's gradient through time is multiplied by ``f_t`` at every step, so
    ``sum_t log f_t`` is the log gain of the cell-state path over the sequence.

    A GRU's update gate ``z_t`` (gate order r, z, n: also the second block, ``n_gates=3``)
    plays the same role: ``h_t = (1 - z_t) * n_t + z_t * h_{t-1}``, so the carry path's
    gain over the sequence is ``prod_t z_t``.

    ``max_batch`` limits the computation to the first sequences of the batch: the
    recomputation costs a quarter of the layer's forward matmuls per sequence, and a few
    sequences estimate a mean over batch, time and units well.

    Returns a float32 tensor ``[mean f, mean over batch and units of sum_t log f_t]``.
    """
    hidden = w_ih.shape[0] // n_gates
    sl = slice(hidden, 2 * hidden)
    if x.ndim == 2:  # unbatched (T, F)
        x, out = x.unsqueeze(1), out.unsqueeze(1)
        h0 = h0.unsqueeze(1) if h0 is not None else None
    elif batch_first:
        x, out = x.transpose(0, 1), out.transpose(0, 1)
    if max_batch is not None and x.shape[1] > max_batch:
        x, out = x[:, :max_batch], out[:, :max_batch]
        h0 = h0[:, :max_batch] if h0 is not None else None
    # x: (T, B, F); out: (T, B, D*P); the forward direction is out[..., :P]
    proj = w_hh.shape[1]
    steps, batch = x.shape[0], x.shape[1]
    h = out[..., :proj].float()
    first = h0[0].float().unsqueeze(0) if h0 is not None else torch.zeros_like(h[:1])
    h_prev = torch.cat([first, h[:-1]], dim=0).reshape(steps * batch, proj)
    # Two 2-D matmuls with the bias fused (addmm): the 3-D strided products of the batch
    # slice cost twice as much on CPU.
    pre = torch.addmm(_gate_bias(b_ih, b_hh, sl, hidden, x), x.float().reshape(steps * batch, -1), w_ih[sl].float().t())
    pre.addmm_(h_prev, w_hh[sl].float().t())
    log_f = torch.nn.functional.logsigmoid(pre)  # log sigmoid, exact for very negative pre
    mean_f = log_f.exp().mean()
    path = log_f.reshape(steps, batch, hidden).sum(dim=0).mean()
    return torch.stack([mean_f, path])


def _gate_bias(b_ih: Tensor | None, b_hh: Tensor | None, sl: slice, hidden: int, like: Tensor) -> Tensor:
    bias = torch.zeros(hidden, device=like.device)
    if b_ih is not None:
        bias = bias + b_ih[sl].float()
    if b_hh is not None:
        bias = bias + b_hh[sl].float()
    return bias


@torch.no_grad()
def packed_lstm_forget_stats(
    data: Tensor,
    out_data: Tensor,
    batch_sizes: Tensor,
    sorted_indices: Tensor | None,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    n_gates: int = 4,
    max_batch: int | None = None,
) -> Tensor:
    """:func:`lstm_forget_stats` for a ``PackedSequence`` (padding excluded).

    Row ``offset[t] + b`` of the packed data is sequence b (in sorted order) at time t,
    so ``h_{t-1}`` for that row is row ``offset[t-1] + b`` of the output. With
    ``max_batch``, only the first (longest) ``max_batch`` sorted sequences are used.
    """
    hidden = w_ih.shape[0] // n_gates
    sl = slice(hidden, 2 * hidden)
    proj = w_hh.shape[1]
    full = batch_sizes.tolist()
    offsets = [0]
    for n in full[:-1]:
        offsets.append(offsets[-1] + n)
    sizes = [min(n, max_batch) for n in full] if max_batch is not None else full
    h = out_data[:, :proj].float()
    device = h.device
    rows = torch.cat([torch.arange(offsets[t], offsets[t] + sizes[t]) for t in range(len(sizes))]).to(device)
    if len(sizes) > 1:
        prev = torch.cat([torch.arange(offsets[t - 1], offsets[t - 1] + sizes[t]) for t in range(1, len(sizes))]).to(
            device
        )
    else:
        prev = torch.zeros(0, dtype=torch.long, device=device)
    if h0 is not None:
        first = h0[0].float()
        if sorted_indices is not None:
            first = first.index_select(0, sorted_indices.to(first.device))
        first = first[: sizes[0]]
    else:
        first = torch.zeros(sizes[0], proj, device=device)
    h_prev = torch.cat([first, h.index_select(0, prev)], dim=0)
    data = data.index_select(0, rows) if len(rows) != data.shape[0] else data
    pre = torch.addmm(_gate_bias(b_ih, b_hh, sl, hidden, data), data.float(), w_ih[sl].float().t())
    pre.addmm_(h_prev, w_hh[sl].float().t())
    log_f = torch.nn.functional.logsigmoid(pre)
    mean_f = log_f.exp().mean()
    # sum over each sequence's own timesteps, then mean over sequences and units
    path = log_f.sum(dim=0) / sizes[0]
    return torch.stack([mean_f, path.mean()])
