"""Propagation through time, measured on a recurrence's own forward trajectory: the
PyTorch kernel of the through-time engine (:mod:`gradwatch.through_time`).

Vanishing and exploding gradients (Pascanu et al. 2013) are properties of the product of
the state Jacobians ds_t/ds_{t-1}. A fused ``nn.LSTM`` kernel never exposes its states, so
on profiled steps the probed sequences are *replayed* through the layer's own weights
(:mod:`gradwatch_torch._trajectory` builds the :class:`Trajectory`), and this module turns a
trajectory into, per probed sequence and every j = 0 .. T-1 steps back (processing order):

* the log of the largest singular value of ds_T/ds_{T-j} and of its RMS gain
  ||ds_T/ds_{T-j}||_F / sqrt(dim s), which the engine's shared rule
  (:func:`gradwatch.through_time.aggregate`, max and median over sequences) turns into
  ``max_gains`` and ``gains`` on the device;
* the forget (LSTM) / update (GRU) gate statistics of the same trajectory;
* a self-check: the layer's output recomputed step by step from the replayed gates.

The state is s = h (RNN, GRU), (h, c) concatenated (LSTM), with h projected when
``proj_size`` is set. Each step's Jacobian is applied analytically (no autograd graph):
the per-step coefficients (gate values and derivatives) are computed for all timesteps in
a few batched tensor operations, then one backward sweep carries a block of row vectors
from s_T to s_1; the Gram matrix of the block at each step gives both numbers for every j.

Exact when ``dim s <= EXACT_DIM``: the block is the whole identity, so at step j it holds
ds_T/ds_{T-j} itself (largest singular value from its Gram matrix, Frobenius norm from its
trace). Above, an estimate per sequence, logs in float64 from float32 sweeps (whose
products with large recurrent weights run in bfloat16 where that is native, see
:func:`gradwatch_torch._sweeps.low_precision`):

* the block starts with *dominant directions*: random tangents started 1, 4, 16, 32, 64,
  ... and T-1 steps before the end and carried forward to s_T (one step of power iteration
  on each product, :func:`gradwatch.through_time.plan.dominant_starts`; those over at most
  16 steps get two more), orthonormalised; the largest singular value of the block's rows
  carried back is a lower bound of the true one, tight where the block contains the
  product's top left singular vector, which a tangent started within a factor 2 of j in
  steps approximates;
* the Frobenius norm is the block's exact part plus random unit rows orthogonal to it,
  weighted (d - K) / r (Hutch++-style, Meyer et al. 2021): unbiased, and since a long
  product is nearly low rank, most of it is counted exactly.

Measured against the float64 reference (:mod:`gradwatch.through_time.reference`) over 20
to 40 probe seeds on tanh RNN 48 (weights x1.5), ReLU RNN 48, GRU 40 (x1 and x2), LSTM 24
(x1.5, x3), LSTM 64 and LSTM 64 -> 256 (the benchmark's W1 layer), T = 60 to 100: worst
over j, ``gains`` within 1.2x for every seed, ``max_gains`` within 1.32x for every seed
and 1.25x for 95% of them (the LSTM 256; 1.20x elsewhere). Each of these is needed at
the LSTM 256: without the tangent at 32 steps (a ReLU RNN 48: 1.45x), without the whole
sequence's (1.51x), or with one extra power iteration fewer (1.30x for 5% of seeds), the
bound is missed. Probe directions come from a private generator seeded from the layer
name and the step, so the user's RNG is never consumed and a repeated or resumed run
measures the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch.through_time.plan import COMPLEMENT_PROBES, EXACT_DIM, seed_for
from gradwatch_torch._gates import gate_statistics

__all__ = ["COMPLEMENT_PROBES", "EXACT_DIM", "Coefficients", "Replayed", "Trajectory", "coefficients", "replay", "seed_for"]

_TINY = 1e-30


@dataclass
class Trajectory:
    """One recurrence (one layer, one direction) on the probed sequences, in processing
    order (a reversed direction's time axis is already flipped).

    ``h[t]`` is the state the layer output after processing ``x[t]``; at padded steps
    (``valid[t, p]`` False) it holds the carried state. ``w_hr`` is the projection of an
    LSTM with ``proj_size``.
    """

    name: str
    kind: str  # "lstm" | "gru" | "rnn_tanh" | "rnn_relu"
    x: Tensor  # (T, P, F)
    h: Tensor  # (T, P, Hp)
    h0: Tensor  # (P, Hp)
    c0: Tensor | None  # (P, H), LSTM only
    valid: Tensor | None  # (T, P) bool; None: every step is real
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None


@dataclass
class Coefficients:
    """Per-step Jacobian coefficients of a trajectory (shapes (T, P, 1, .) so they
    broadcast over the probe axis).

    LSTM: ``a`` = o (1 - tanh^2 c), ``g`` = [g i(1-i), c_prev f(1-f), i(1-g^2), tanh(c) o(1-o)],
    ``f`` the forget gate. GRU: ``f`` = z, ``g`` = the 3H coefficients of r, z, n.
    RNN: ``a`` = the activation's derivative.
    """

    kind: str
    w_hh: Tensor
    w_hr: Tensor | None
    a: Tensor | None
    g: Tensor | None
    f: Tensor | None
    valid: Tensor | None  # (T, P, 1, 1) bool
    dim: int
    #: Log of the gate that carries the state (LSTM forget, GRU update), (T, P, H).
    log_gate: Tensor | None
    #: The layer's output recomputed from the replay, to compare with ``Trajectory.h``.
    h_check: Tensor


@dataclass
class Replayed:
    """What one recurrence's replay measured (all on the device, no host sync)."""

    name: str
    gains: Tensor  # (T,) float64: RMS gain, median over the probed sequences
    max_gains: Tensor  # (T,) float64: largest singular value, max over the probed sequences
    gate_mean: Tensor | None  # () mean gate over valid steps, sequences and units
    gate_path: Tensor | None  # () mean over sequences and units of sum_t log gate
    deviation: Tensor  # () largest |recomputed - actual output| / largest |output|


def _sig_parts(a: Tensor, hidden: int) -> tuple[Tensor, ...]:
    return a.split(hidden, dim=-1)


@torch.no_grad()
def coefficients(tr: Trajectory) -> Coefficients:
    """All per-step Jacobian coefficients of ``tr`` in batched operations.

    The gates are recomputed from (x_t, h_{t-1}) with h_{t-1} the layer's own output, so
    everything except an LSTM's cell state is computed for all t at once; the cell state
    is one elementwise scan over T.
    """
    T, P = tr.x.shape[0], tr.x.shape[1]
    dt, dev = tr.x.dtype, tr.x.device
    h_prev = torch.cat([tr.h0.unsqueeze(0), tr.h[:-1]], dim=0)
    rows = T * P
    x2, h2 = tr.x.reshape(rows, -1), h_prev.reshape(rows, -1)
    valid = tr.valid.view(T, P, 1, 1) if tr.valid is not None else None
    hidden = tr.w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(tr.kind, 1)
    if tr.kind != "gru":  # one pre-activation: x W_ih^T + h W_hh^T + biases, fused
        pre = x2 @ tr.w_ih.t() if tr.b_ih is None else torch.addmm(tr.b_ih, x2, tr.w_ih.t())
        pre.addmm_(h2, tr.w_hh.t())
        if tr.b_hh is not None:
            pre += tr.b_hh
        pre = pre.view(T, P, -1)
    if tr.kind == "lstm":
        sig = pre.sigmoid()  # i, f, o (the g block's sigmoid is computed and unused: one pass)
        ds = sig * (1 - sig)
        i, f, o = sig[..., :hidden], sig[..., hidden : 2 * hidden], sig[..., 3 * hidden :]
        g = pre[..., 2 * hidden : 3 * hidden].tanh()
        ig = i * g
        f_scan, ig_scan = f, ig
        if tr.valid is not None:  # padded steps carry the cell state unchanged
            v = tr.valid.unsqueeze(-1)
            f_scan, ig_scan = torch.where(v, f, 1.0), torch.where(v, ig, 0.0)
        c = torch.empty(T + 1, P, hidden, dtype=dt, device=dev)  # c[0] = c0, c[t + 1] = c_t
        c[0] = tr.c0 if tr.c0 is not None else 0.0
        for t in range(T):
            torch.addcmul(ig_scan[t], f_scan[t], c[t], out=c[t + 1])
        tc = c[1:].tanh()
        gcoef = torch.empty(T, P, 4 * hidden, dtype=dt, device=dev)
        torch.mul(g, ds[..., :hidden], out=gcoef[..., :hidden])
        torch.mul(c[:-1], ds[..., hidden : 2 * hidden], out=gcoef[..., hidden : 2 * hidden])
        torch.mul(i, 1 - g * g, out=gcoef[..., 2 * hidden : 3 * hidden])
        torch.mul(tc, ds[..., 3 * hidden :], out=gcoef[..., 3 * hidden :])
        h_check = o * tc
        a = o * (1 - tc * tc)
        if tr.w_hr is not None:
            h_check = h_check @ tr.w_hr.t()
        proj = tr.w_hr.shape[0] if tr.w_hr is not None else hidden
        return Coefficients(
            "lstm", tr.w_hh, tr.w_hr, a.unsqueeze(2), gcoef.unsqueeze(2), f.unsqueeze(2), valid, proj + hidden,
            torch.nn.functional.logsigmoid(pre[..., hidden : 2 * hidden]), h_check,
        )
    if tr.kind == "gru":
        gi = x2 @ tr.w_ih.t() if tr.b_ih is None else torch.addmm(tr.b_ih, x2, tr.w_ih.t())
        gh = h2 @ tr.w_hh.t() if tr.b_hh is None else torch.addmm(tr.b_hh, h2, tr.w_hh.t())
        ir, iz, in_ = _sig_parts(gi.view(T, P, 3 * hidden), hidden)
        hr, hz, hn = _sig_parts(gh.view(T, P, 3 * hidden), hidden)
        r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
        n = torch.addcmul(in_, r, hn).tanh()
        dn = (1 - z) * (1 - n * n)
        gcoef = torch.cat([dn * hn * r * (1 - r), (h_prev - n) * z * (1 - z), dn * r], dim=-1)
        h_check = n + z * (h_prev - n)
        return Coefficients(
            "gru", tr.w_hh, None, None, gcoef.unsqueeze(2), z.unsqueeze(2), valid, hidden,
            torch.nn.functional.logsigmoid(iz + hz), h_check,
        )
    if tr.kind == "rnn_relu":
        h_check = pre.clamp_min(0)
        deriv = (pre > 0).to(dt)
    else:
        h_check = pre.tanh()
        deriv = 1 - h_check * h_check
    return Coefficients(tr.kind, tr.w_hh, None, deriv.unsqueeze(2), None, None, valid, hidden, None, h_check)


def _split(u: Tensor, co: Coefficients) -> tuple[Tensor, Tensor | None]:
    if co.kind != "lstm":
        return u, None
    proj = co.w_hh.shape[1]
    return u[..., :proj], u[..., proj:]


def _per_step(co: Coefficients) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """Each coefficient as a list of per-step views, made once (indexing a Python list
    costs nothing, a tensor ``select`` a dispatch per use)."""
    T = co.h_check.shape[0]

    def steps(x: Tensor | None) -> list[Any]:
        return list(x.unbind(0)) if x is not None else [None] * T

    return steps(co.a), steps(co.g), steps(co.f), steps(co.valid)


def _mm(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w``; in ``w``'s dtype when the sweeps carry their weights in bfloat16
    (:func:`gradwatch_torch._sweeps.low_precision`), the result back in ``x``'s dtype."""
    return x @ w if x.dtype == w.dtype else (x.to(w.dtype) @ w).to(x.dtype)


def _gated(u: Tensor, g: Tensor, blocks: int, dtype: torch.dtype, last: Tensor | None = None) -> Tensor:
    """[u g_1, ..., u g_blocks] (``last`` instead of ``u`` in the last block), written
    straight into the dtype of the product that follows: one pass, no concatenation."""
    hid = u.shape[-1]
    out = torch.empty((*u.shape[:-1], blocks, hid), dtype=dtype, device=u.device)
    gb = g.unflatten(-1, (blocks, hid))
    if last is None:
        torch.mul(u.unsqueeze(-2), gb, out=out)
    else:
        torch.mul(u.unsqueeze(-2), gb[..., :-1, :], out=out[..., :-1, :])
        torch.mul(last, gb[..., -1, :], out=out[..., -1, :])
    return out.flatten(-2)


def _vjp(co: Coefficients, a: Any, g: Any, f: Any, v: Any, uh: Tensor, uc: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Cotangent of s_{t-1} from the cotangent (uh, uc) of s_t: one transposed Jacobian
    (``a``, ``g``, ``f``, ``v``: step t's coefficients and validity)."""
    lp = co.w_hh.dtype
    if co.kind == "lstm":
        um = uh if co.w_hr is None else _mm(uh, co.w_hr)
        ubar = torch.addcmul(uc, um, a)  # type: ignore[arg-type]
        nh, nc = (_gated(ubar, g, 4, lp, last=um) @ co.w_hh).to(uh.dtype), ubar.mul_(f)
    elif co.kind == "gru":
        nh, nc = torch.addcmul((_gated(uh, g, 3, lp) @ co.w_hh).to(uh.dtype), uh, f), None
    else:
        nh, nc = (torch.mul(uh, a, out=torch.empty(uh.shape, dtype=lp, device=uh.device)) @ co.w_hh).to(uh.dtype), None
    if v is not None:  # a padded step is the identity
        nh = torch.where(v, nh, uh)
        nc = torch.where(v, nc, uc) if nc is not None and uc is not None else None
    return nh, nc


def _mm_times(x: Tensor, w: Tensor, g: Tensor) -> Tensor:
    """``(x @ w) * g`` in ``x``'s dtype, the product in ``w``'s (see :func:`_mm`); with
    bfloat16 weights the multiplication by ``g`` (float32) is also the cast back."""
    if x.dtype == w.dtype:
        return (x @ w).mul_(g)
    return torch.mul(x.to(w.dtype) @ w, g)


def _jvp(co: Coefficients, a: Any, g: Any, f: Any, v: Any, wh: Tensor, wc: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Tangent of s_t from the tangent (wh, wc) of s_{t-1}: one Jacobian."""
    if co.kind == "lstm":
        parts = _mm_times(wh, co.w_hh.t(), g).unflatten(-1, (4, f.shape[-1]))
        nc = torch.add(parts[..., 0, :], parts[..., 1, :]).add_(parts[..., 2, :]).addcmul_(f, wc)  # type: ignore[arg-type]
        nm = torch.addcmul(parts[..., 3, :], a, nc)
        nh = nm if co.w_hr is None else _mm(nm, co.w_hr.t())
    elif co.kind == "gru":
        parts = _mm_times(wh, co.w_hh.t(), g).unflatten(-1, (3, f.shape[-1]))
        nh, nc = torch.add(parts[..., 0, :], parts[..., 1, :]).add_(parts[..., 2, :]).addcmul_(wh, f), None
    else:
        nh, nc = _mm_times(wh, co.w_hh.t(), a), None
    if v is not None:
        nh = torch.where(v, nh, wh)
        nc = torch.where(v, nc, wc) if nc is not None and wc is not None else None
    return nh, nc


def _deviation(co: Coefficients, tr: Trajectory) -> Tensor:
    """Largest |recomputed - actual output| over the largest |output|, on the finite
    outputs of real steps (a layer whose output went non-finite is not the replay's
    fault: its gains come out NaN, and the check stays quiet)."""
    keep = torch.isfinite(tr.h) & torch.isfinite(co.h_check)
    if tr.valid is not None:
        keep &= tr.valid.unsqueeze(-1)
    diff = torch.where(keep, (co.h_check - tr.h).abs(), 0.0)
    scale = torch.where(keep, tr.h.abs(), 0.0)
    return diff.max() / scale.max().clamp_min(1e-6)


@torch.no_grad()
def replay(tr: Trajectory, generator: torch.Generator) -> Replayed:
    """Gains, gate statistics and the self-check of one recurrence."""
    co = coefficients(tr)
    mean, path = gate_statistics(co.log_gate, tr.valid) if co.log_gate is not None else (None, None)
    from gradwatch_torch._sweeps import gains  # the sweeps build on this module's kernels

    rms, top = gains(co, generator)
    return Replayed(tr.name, rms, top, mean, path, _deviation(co, tr))
