"""Propagation of a diagonal (gated linear) recurrence, exact at any size.

For h_t = a_t * h_{t-1} + b_t (elementwise; minGRU and minLSTM: a_t = 1 - z_t, Mamba:
a_t = exp(dt_t A) per channel and state, xLSTM's forget path, RG-LRU: a^(c r_t)), the
state Jacobian product over j steps back is diagonal::

    ds_T / ds_{T-j} = diag( prod_{k=T-j+1..T} a_k )

so its largest singular value is the largest entry and its RMS gain the root mean square
of the entries: a reverse cumulative sum of log a_t, O(T * state) per sequence, no probe
vectors, no estimate. A backend's kernel only has to say what log a_t is for the probed
sequences; this module turns it into the contract's two profiles, on the device.
"""

from __future__ import annotations

import math
from typing import Any

from gradwatch.through_time.fit import aggregate
from gradwatch.through_time.ops import NUMPY_TENSORS

__all__ = ["diagonal_logs", "diagonal_propagation"]


def diagonal_logs(log_a: Any, ops: Any = NUMPY_TENSORS) -> tuple[Any, Any]:
    """Per-sequence logs (T, P) of the RMS gain and of the largest gain.

    ``log_a``: (T, P, S) log of each step's decay, in processing order, S the state
    entries of one position flattened (D for minGRU, D x N for Mamba); a padded or masked
    step must hold 0 (the identity). Row j of the result is j steps back from the last
    processed step (row 0 = 0: the identity).
    """
    steps, size = int(log_a.shape[0]), int(log_a.shape[2])
    back = ops.cumsum(ops.flip(log_a, 0), 0)  # back[j - 1] = sum of the last j log decays
    zero = ops.zeros_like(back[:1])
    logs = ops.concat([zero, back[: steps - 1]], 0)  # (T, P, S)
    log_rms = 0.5 * (ops.logsumexp(2.0 * logs, 2) - math.log(size))
    return log_rms, ops.amax(logs, 2)


def diagonal_propagation(log_a: Any, ops: Any = NUMPY_TENSORS) -> tuple[Any, Any]:
    """(gains, max_gains), each (T,), of a diagonal recurrence (see the module docstring):
    gains the median over sequences of the RMS gain, max_gains the max over sequences of
    the largest entry of the product."""
    log_rms, log_top = diagonal_logs(log_a, ops)
    return aggregate(log_rms, log_top, ops)
