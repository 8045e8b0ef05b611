"""The float64 reference every backend's propagation is tested against (numpy only).

Two parts, independent of any framework:

* :func:`propagation_from_jacobians`: given each step's state Jacobian ds_t/ds_{t-1} of
  each probed sequence, multiply them out in float64 and take, for every j, the largest
  singular value (SVD) and the RMS gain (Frobenius norm over sqrt(dim s)) of the product
  over the last j steps, then the contract's aggregate over sequences. This is the
  definition in shared/API.md, computed the slow, obvious way.
* :func:`cell_jacobians`: the state Jacobians of the standard cells (tanh / ReLU RNN,
  GRU, LSTM with optional projection) in PyTorch's weight layout and gate order, from the
  cell equations by hand, with the states of the forward pass. Keras' cells map onto it:
  an LSTM's kernels transposed (gate order i, f, c, o is PyTorch's i, f, g, o), a GRU
  (``reset_after=True``) transposed with its gates reordered from z, r, h to r, z, n.

Tests derive Jacobians independently too (``torch.func.jacrev``, ``tf.GradientTape``,
``jax.jacrev``) and compare with both this and the backends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gradwatch.through_time.fit import aggregate
from gradwatch.through_time.ops import NUMPY_TENSORS

__all__ = ["cell_jacobians", "diagonal_jacobians", "propagation_from_jacobians"]


def propagation_from_jacobians(jacobians: Any) -> tuple[np.ndarray, np.ndarray]:
    """(gains, max_gains), each (T,), from per-step Jacobians shaped (P, T, d, d).

    ``jacobians[p, t]`` maps the state before step t to the state after it, t = 0 .. T-1
    in processing order; entry j of the result is the product of the last j of them
    (j = 0: the identity). A padded step is an identity matrix.
    """
    jac = np.asarray(jacobians, dtype=np.float64)
    P, T, d = jac.shape[0], jac.shape[1], jac.shape[2]
    log_rms = np.zeros((T, P))
    log_top = np.zeros((T, P))
    for p in range(P):
        prod = np.eye(d)
        for j in range(1, T):
            prod = prod @ jac[p, T - j]  # ds_T/ds_{T-j} = J_T ... J_{T-j+1}
            with np.errstate(divide="ignore", invalid="ignore"):
                if np.all(np.isfinite(prod)):
                    s = np.linalg.svd(prod, compute_uv=False)
                    log_top[j, p] = np.log(s[0])
                    log_rms[j, p] = np.log(np.sqrt(np.sum(s * s) / d))
                else:
                    log_top[j, p] = log_rms[j, p] = np.nan
    return aggregate(log_rms, log_top, NUMPY_TENSORS)


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def cell_jacobians(kind: str, x: Any, weights: Mapping[str, Any], h0: Any = None, c0: Any = None) -> np.ndarray:
    """State Jacobians (T, d, d) of one sequence ``x`` (T, F) through one cell, float64.

    ``kind``: "rnn_tanh", "rnn_relu", "gru", "lstm". ``weights``: PyTorch names without
    the layer suffix: ``weight_ih`` (G*H, F), ``weight_hh`` (G*H, Hp), optional
    ``bias_ih``, ``bias_hh``, ``weight_hr`` (Hp, H, LSTM projection). The state is h, or
    (h, c) concatenated for an LSTM.
    """
    x = np.asarray(x, dtype=np.float64)
    w = {k: (None if v is None else np.asarray(v, dtype=np.float64)) for k, v in weights.items()}
    w_ih, w_hh = w["weight_ih"], w["weight_hh"]
    b_ih = w.get("bias_ih")
    b_hh = w.get("bias_hh")
    w_hr = w.get("weight_hr")
    b_ih = np.zeros(w_ih.shape[0]) if b_ih is None else b_ih
    b_hh = np.zeros(w_hh.shape[0]) if b_hh is None else b_hh
    hp = w_hh.shape[1]
    h = np.zeros(hp) if h0 is None else np.asarray(h0, dtype=np.float64)
    out = []
    if kind in ("rnn_tanh", "rnn_relu"):
        for t in range(x.shape[0]):
            pre = w_ih @ x[t] + b_ih + w_hh @ h + b_hh
            if kind == "rnn_tanh":
                h = np.tanh(pre)
                d = 1.0 - h * h
            else:
                h = np.maximum(pre, 0.0)
                d = (pre > 0).astype(np.float64)
            out.append(d[:, None] * w_hh)
        return np.stack(out)
    if kind == "gru":
        H = hp
        for t in range(x.shape[0]):
            gi = w_ih @ x[t] + b_ih
            gh = w_hh @ h + b_hh
            r = _sig(gi[:H] + gh[:H])
            z = _sig(gi[H : 2 * H] + gh[H : 2 * H])
            n = np.tanh(gi[2 * H :] + r * gh[2 * H :])
            dn = (1 - z) * (1 - n * n)
            dr = r * (1 - r)
            dz = z * (1 - z)
            jac = (
                np.diag(z)
                + (dz * (h - n))[:, None] * w_hh[H : 2 * H]
                + dn[:, None] * (r[:, None] * w_hh[2 * H :] + (gh[2 * H :] * dr)[:, None] * w_hh[:H])
            )
            out.append(jac)
            h = (1 - z) * n + z * h
        return np.stack(out)
    if kind == "lstm":
        H = w_hh.shape[0] // 4
        c = np.zeros(H) if c0 is None else np.asarray(c0, dtype=np.float64)
        proj = np.eye(H) if w_hr is None else w_hr
        for t in range(x.shape[0]):
            pre = w_ih @ x[t] + b_ih + w_hh @ h + b_hh
            i, f, g, o = _sig(pre[:H]), _sig(pre[H : 2 * H]), np.tanh(pre[2 * H : 3 * H]), _sig(pre[3 * H :])
            c_new = f * c + i * g
            tc = np.tanh(c_new)
            # d pre / d h_prev = w_hh; gates' derivatives
            di = (i * (1 - i))[:, None] * w_hh[:H]
            df = (f * (1 - f))[:, None] * w_hh[H : 2 * H]
            dg = (1 - g * g)[:, None] * w_hh[2 * H : 3 * H]
            do = (o * (1 - o))[:, None] * w_hh[3 * H :]
            dc_dh = g[:, None] * di + c[:, None] * df + i[:, None] * dg  # (H, Hp)
            dc_dc = np.diag(f)
            dm_dh = tc[:, None] * do + (o * (1 - tc * tc))[:, None] * dc_dh
            dm_dc = np.diag(o * (1 - tc * tc)) @ dc_dc
            top = np.concatenate([proj @ dm_dh, proj @ dm_dc], axis=1)
            bottom = np.concatenate([dc_dh, dc_dc], axis=1)
            out.append(np.concatenate([top, bottom], axis=0))
            h, c = proj @ (o * tc), c_new
        return np.stack(out)
    raise ValueError(f"unknown cell kind {kind!r}; expected rnn_tanh, rnn_relu, gru or lstm")


def diagonal_jacobians(decays: Any) -> np.ndarray:
    """Per-step Jacobians (P, T, S, S) of a diagonal recurrence from its decays (P, T, S)."""
    a = np.asarray(decays, dtype=np.float64)
    eye = np.eye(a.shape[-1])
    return a[..., None] * eye
