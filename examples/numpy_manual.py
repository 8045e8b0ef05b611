"""gradwatch from plain numpy: a vanilla tanh RNN trained by hand-written BPTT.

Any framework without a gradwatch backend (JAX, numpy, your own autodiff) uses the core
directly: give ``Monitor.observe`` the gradients as arrays each step and apply the
decision it returns. Here we also pass the per-timestep gradient norms of the input,
which our hand-written backward pass computes anyway, so gradwatch can show the gradient
vanishing through time.

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
    return loss, grads, dx_norms


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
        loss, grads, dx_norms = forward_backward(params, x, y)
        temporal = {"rnn": dx_norms} if monitor.profile_due() else None
        record = monitor.observe(grads, temporal=temporal)
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
