"""Float64 numpy truth of Keras' recurrent cells (SimpleRNN, LSTM, GRU either reset
placement, their dropout masks): one step, its Jacobian, and the gains of the products
over the first sequences. Backend-free (weights read with ``Variable.numpy()``), shared by
the TensorFlow propagation tests and the Keras tests of every backend."""

from __future__ import annotations

import math

import numpy as np


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


ACTS = {
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z))),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
    "softsign": (lambda z: z / (1 + np.abs(z)), lambda z: 1 / (1 + np.abs(z)) ** 2),
}


def cell_params(layer):
    """Weights (float64) and activations of a Keras RNN layer's cell."""
    cell = layer.cell
    return {
        "kind": type(cell).__name__,
        "W": cell.kernel.numpy().astype(np.float64),
        "U": cell.recurrent_kernel.numpy().astype(np.float64),
        "b": None if cell.bias is None else cell.bias.numpy().astype(np.float64),
        "act": cell.activation.__name__,
        "ract": getattr(getattr(cell, "recurrent_activation", None), "__name__", None),
        "reset_after": getattr(cell, "reset_after", None),
    }


def _gate(m, g, n):
    """Mask of gate g (a list of per-gate masks, one mask for all, or None) of length n."""
    if m is None:
        return np.ones(n)
    return np.asarray(m[g] if isinstance(m, list) else m, np.float64)


def step(p, x, s, dp=None, rdp=None):
    """One step of one sequence: new state, its Jacobian d s_new / d s, the keep gate."""
    a, da = ACTS[p["act"]]
    W, U, b = p["W"], p["U"], p["b"]
    u = U.shape[0]
    blocks = U.shape[1] // u
    xs = [(x * _gate(dp, g, x.shape[0])) @ W[:, g * u : (g + 1) * u] for g in range(blocks)]
    # A[g] = d (h * rdp_g) U_g / d h, shape (u, u): row m = output unit, column n = h_n.
    A = [(U[:, g * u : (g + 1) * u] * _gate(rdp, g, u)[:, None]).T for g in range(blocks)]
    if p["kind"] == "SimpleRNNCell":
        pre = xs[0] + (0 if b is None else b) + A[0] @ s
        return a(pre), da(pre)[:, None] * A[0], None
    r, dr = ACTS[p["ract"]]
    if p["kind"] == "LSTMCell":
        h, c = s[:u], s[u:]
        zi, zf, zg, zo = (xs[g] + b[g * u : (g + 1) * u] + A[g] @ h for g in range(4))
        i, f, g_, o = r(zi), r(zf), a(zg), r(zo)
        c_new = f * c + i * g_
        dc_dh = (c * dr(zf))[:, None] * A[1] + (g_ * dr(zi))[:, None] * A[0] + (i * da(zg))[:, None] * A[2]
        dh_dh = (a(c_new) * dr(zo))[:, None] * A[3] + (o * da(c_new))[:, None] * dc_dh
        J = np.block([[dh_dh, np.diag(o * da(c_new) * f)], [dc_dh, np.diag(f)]])
        return np.concatenate([o * a(c_new), c_new]), J, f
    # GRUCell
    h = s
    if p["reset_after"]:
        bi, bh = (b[0], b[1]) if b is not None else (np.zeros(3 * u), np.zeros(3 * u))
        mi = [A[g] @ h + bh[g * u : (g + 1) * u] for g in range(3)]
        zp, rp = xs[0] + bi[:u] + mi[0], xs[1] + bi[u : 2 * u] + mi[1]
        z, rr = r(zp), r(rp)
        ap = xs[2] + bi[2 * u :] + rr * mi[2]
        dap = (mi[2] * dr(rp))[:, None] * A[1] + rr[:, None] * A[2]
    else:
        bi = b if b is not None else np.zeros(3 * u)
        zp, rp = xs[0] + bi[:u] + A[0] @ h, xs[1] + bi[u : 2 * u] + A[1] @ h
        z, rr = r(zp), r(rp)
        hm = h * _gate(rdp, 2, u)
        Uh = U[:, 2 * u :]
        ap = xs[2] + bi[2 * u :] + (rr * hm) @ Uh
        dq = np.diag(rr * _gate(rdp, 2, u)) + (hm * dr(rp))[:, None] * A[1]
        dap = Uh.T @ dq
    hh = a(ap)
    J = np.diag(z) + ((h - hh) * dr(zp))[:, None] * A[0] + ((1 - z) * da(ap))[:, None] * dap
    return z * h + (1 - z) * hh, J, z


def exact(p, x, *, mask=None, init=None, backwards=False, dp=None, rdp=None, top=False):
    """gains[j] (j = 0 .. T-1) over the first min(B, 8) sequences (the median of the RMS
    gain, on logs; with ``top``: the max of the largest singular value), and the keep
    gate's [mean, mean over units of sum_t log gate] on unmasked steps."""
    x = np.asarray(x, np.float64)[:8]
    n, T = x.shape[:2]
    mask = np.ones((n, T), bool) if mask is None else np.asarray(mask, bool)[:8]
    if backwards:
        x, mask = x[:, ::-1], mask[:, ::-1]
    u = p["U"].shape[0]
    d = 2 * u if p["kind"] == "LSTMCell" else u
    logs = np.zeros((n, T))
    tops = np.zeros((n, T))
    gates = []
    for k in range(n):
        s = np.zeros(d) if init is None else np.concatenate([np.asarray(v[k], np.float64) for v in init])
        jacs = []
        for t in range(T):
            dpk = None if dp is None else [m[k] for m in dp]
            rdpk = None if rdp is None else [m[k] for m in rdp]
            new, J, g = step(p, x[k, t], s, dpk, rdpk)
            if mask[k, t]:
                s = new
                if g is not None:
                    gates.append(g)
            else:
                J = np.eye(d)
            jacs.append(J)
        P = np.eye(d)
        for j in range(1, T):
            P = P @ jacs[T - j]
            logs[k, j] = math.log(np.linalg.norm(P) / math.sqrt(d))
            tops[k, j] = math.log(np.linalg.norm(P, 2))
    srt = np.sort(logs, axis=0)
    gains = np.exp(0.5 * (srt[(n - 1) // 2] + srt[n // 2]))
    if top:
        gains = np.exp(tops.max(axis=0))
    if not gates:
        return gains, None
    G = np.array(gates)
    return gains, (G.mean(), np.log(G).sum(axis=0).sum() / (n * u))
