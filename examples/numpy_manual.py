"""gradwatch from plain numpy: a vanilla tanh RNN trained by hand-written BPTT.

Any framework without a gradwatch backend (JAX, numpy, your own autodiff) uses the core
directly: give ``Monitor.observe`` the gradients as arrays each step and apply the
decision it returns. On profiled steps we also pass two things our hand-written backward
pass has at hand: the per-timestep norms of dL/dx_t (which timesteps the loss draws on)
and the gains of the state Jacobian product dh_T/dh_{T-j} (how far a gradient survives
going back through the recurrence), on which gradwatch judges vanishing and exploding.

Run:  python examples/numpy_manual.py [--steps 200] [--seq 60]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

import gradwatch


def forward_backward(params, x, y):
    """Loss and gradients of a tanh RNN whose prediction is read at the last step."""
    W_xh, W_hh, b_h, w_out = params["rnn.W_xh"], params["rnn.W_hh"], params["rnn.b_h"], params["head.w"]
    T, B, _ = x.shape
    H = W_hh.shape[0]
    hs = [np.zeros((B, H))]
    for t in range(T):
        hs.append(np.tanh(x[t] @ W_xh.T + hs[-1] @ W_hh.T + b_h))
    pred = hs[-1] @ w_out
    loss = 0.5 * np.mean((pred - y) ** 2)
    # Backward through time.
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    d_pred = (pred - y) / B
    grads["head.w"] = hs[-1].T @ d_pred
    dh = np.outer(d_pred, w_out)
    dx_norms = np.zeros(T)  # ||dL/dx_t|| over batch and features: the temporal profile
    for t in reversed(range(T)):
        da = dh * (1.0 - hs[t + 1] ** 2)
        grads["rnn.W_xh"] += da.T @ x[t]
        grads["rnn.W_hh"] += da.T @ hs[t]
        grads["rnn.b_h"] += da.sum(0)
        dx_norms[t] = np.linalg.norm(da @ W_xh)
        dh = da @ W_hh
    return loss, grads, dx_norms, hs


def propagation_gains(W_hh, hs, probed=8):
    """RMS gains ||dh_T/dh_{T-j}||_F / sqrt(H), j = 0..T-1 (back to the first step's
    state), the geometric mean over the first ``probed`` sequences, as the backends
    measure them: one step's Jacobian dh_t/dh_{t-1} is diag(1 - h_t^2) @ W_hh."""
    T, H = len(hs) - 1, W_hh.shape[0]
    logs = []
    for b in range(min(probed, hs[0].shape[0])):
        J = np.eye(H)
        gains = [1.0]
        for t in range(T, 1, -1):  # extend dh_T/dh_t to dh_T/dh_{t-1}
            J = J @ ((1.0 - hs[t][b] ** 2)[:, None] * W_hh)
            gains.append(np.linalg.norm(J) / np.sqrt(H))
        logs.append(np.log(np.maximum(gains, 1e-300)))
    return np.exp(np.mean(logs, axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=60)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rng = np.random.default_rng(0)
    D, H, B = 4, 16, 32
    params = {
        "rnn.W_xh": rng.normal(0, 0.5, (H, D)),
        "rnn.W_hh": rng.normal(0, 1.0 / np.sqrt(H), (H, H)),
        "rnn.b_h": np.zeros(H),
        "head.w": rng.normal(0, 0.1, H),
    }
    # policy="fixed" clips the global norm at max_norm; log_every sets the summary lines.
    monitor = gradwatch.Monitor(policy="fixed", max_norm=1.0, log_every=50, profile_every=25)
    lr = 0.05
    for step in range(1, args.steps + 1):
        x = rng.normal(size=(args.seq, B, D))
        y = x[0, :, 0]  # the label depends on the FIRST timestep only: a long dependency
        loss, grads, dx_norms, hs = forward_backward(params, x, y)
        temporal = propagation = None
        if monitor.profile_due():
            temporal = {"rnn": dx_norms}
            propagation = {"rnn": {"l0": propagation_gains(params["rnn.W_hh"], hs)}}
        record = monitor.observe(grads, temporal=temporal, propagation=propagation)
        if record.skipped:
            continue
        grads = monitor.clip_gradients(grads, record)
        for k in params:
            params[k] -= lr * grads[k]
    monitor.close()
    last = monitor.records[-1]
    prof = next((r.temporal["rnn"] for r in reversed(monitor.records) if r.temporal), None)
    print(f"steps: {last.step}, final loss {loss:.4f}, last global norm {last.global_norm:.3g}")
    if prof is not None:
        print(f"rnn: gain per step {prof.gain:.3f}, horizon {prof.horizon} of {prof.length} timesteps")
    print(f"events: {sorted({e.kind for e in monitor.events})}")


if __name__ == "__main__":
    main()
