"""The portable step's per-step arithmetic in torch itself, on Keras' torch backend.

Why: Keras on torch runs the train step eagerly, and every ``keras.ops`` call pays its
own Python dispatch (argument conversion, symbolic-tensor checks: 20 to 40 µs on this
machine) before torch's few µs. The statistics of a step written op by op in
``keras.ops`` (four ops per gradient for its squared norm, two for its finiteness, then
the stacks, the casts, the row and the ring) cost 2 to 3 ms of a 15 ms LSTM step, most
of issue 18's overhead on torch. Here the same values come from a few torch calls
whatever the number of gradients: ``torch._foreach_norm`` over the gradients (one
dispatch), the same over the gradients times zero for finiteness, one ``cat`` for the
row and one ``index_copy`` into the ring.

What is recorded does not change: the squared norm of each gradient (float32 maths,
stored as float64), whether each holds a NaN or an Inf, the global norm, the row in the
core's layout. The squared norm is the square of the float32 norm (``_foreach_norm``
reduces float32 with a wider accumulator on the CPU), so it agrees with the sum of
squares to float32 rounding (tested against float64 numpy). Finiteness is exact: a
gradient times zero is all zeros unless an element is NaN or Inf (both give NaN), so its
norm is NaN exactly when the gradient is not finite, and it cannot overflow, unlike the
norm of a large but finite gradient.

JAX keeps the ``keras.ops`` step: under ``jax.jit`` the ops are fused by XLA and cost no
dispatch.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["TorchStep", "torch_step"]


class TorchStep:
    """The per-step arithmetic of :mod:`gradwatch_tf.portable` in torch (see the module)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def stats(self, grads: list[Any], idx: list[int | None], n_params: int) -> tuple[Any, Any, Any, Any]:
        """(squared norms [n_params], non-finite flags [n_params], global norm, all
        finite) as float64 tensors (a bool for the last), ``idx[j]`` the bound position
        of ``grads[j]`` (None: measured into the global norm, not a parameter of ours)."""
        torch = self.torch
        present = [j for j, x in enumerate(grads) if x is not None]
        with torch.no_grad():
            if not present:
                zeros = torch.zeros(n_params, dtype=torch.float64)
                return zeros, zeros.clone(), torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.bool)
            flat = [grads[j] if grads[j].dtype == torch.float32 else grads[j].float() for j in present]
            sq = torch.stack(torch._foreach_norm(flat)).double().square()
            bad = torch.stack(torch._foreach_norm(torch._foreach_mul(flat, 0.0))).isnan()
            norm = sq.sum().sqrt()
            all_ok = bad.logical_not().all()
            if len(present) == n_params and all(idx[j] == j for j in present):  # the usual case
                return sq, bad.double(), norm, all_ok
            per_sq = torch.zeros(n_params, dtype=torch.float64, device=sq.device)
            per_nf = torch.zeros(n_params, dtype=torch.float64, device=sq.device)
            src = [k for k, j in enumerate(present) if idx[j] is not None]
            if src:
                dst = torch.tensor([idx[present[k]] for k in src], device=sq.device)
                pick = torch.tensor(src, device=sq.device)
                per_sq.index_copy_(0, dst, sq.index_select(0, pick))
                per_nf.index_copy_(0, dst, bad.index_select(0, pick).double())
        return per_sq, per_nf, norm, all_ok

    def profiled(self, step: Any, every: int) -> Any:
        """The profiling rule (:func:`gradwatch.profile_due`) on the step counter."""
        torch = self.torch
        if every <= 0:
            return torch.zeros((), dtype=torch.float64)
        return torch.logical_or(step == 1, step % every == 0).double()

    def concat(self, parts: list[Any]) -> Any:
        """The row: every part flattened, as float64, one ``cat``."""
        torch = self.torch
        with torch.no_grad():
            return torch.cat([torch.as_tensor(t).detach().reshape(-1).to(torch.float64) for t in parts])

    def write(self, ring: Any, step_var: Any, step: Any, row: Any, capacity: int) -> None:
        """Row into slot ``(step - 1) % capacity`` of the ring, then the counter + 1."""
        torch = self.torch
        with torch.no_grad():
            slot = torch.remainder(step.reshape(1).long() - 1, capacity)
            ring.assign(torch.index_copy(ring.value, 0, slot, row.reshape(1, -1).to(ring.value.dtype)))
            step_var.assign(step + 1)


_TORCH: TorchStep | None = None


def torch_step() -> TorchStep | None:
    """The torch arithmetic on Keras' torch backend, else None (the ``keras.ops`` step)."""
    global _TORCH
    if keras.backend.backend() != "torch":
        return None
    if _TORCH is None:
        _TORCH = TorchStep()
    return _TORCH
