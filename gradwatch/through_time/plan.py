"""The probe plan and the cost model, one set of numbers for every backend.

*Which* sequences: the first ``min(batch, PROBED)`` of the batch, in the user's order.
*How*: a state of at most ``EXACT_DIM`` numbers carries the whole identity back (exact);
above, a block of directions (the dominant ones found by carrying random tangents forward,
and random ones orthogonal to them) estimates both the largest singular value and the
Frobenius norm (see :mod:`gradwatch_torch._replay` for the estimator and its measured
error). *When*: on every profiled step when the replay is cheap; a layer whose replay
would cost more than ``REPLAY_SHARE`` of the profiled steps' time (or, with spaced
profiles, ``REPLAY_SHARE_OF_TRAINING`` of all steps) replays on every n-th profiled step
only (:func:`replay_every`), from shapes alone, so a repeated or resumed
run (and every rank of a distributed one) measures on the same steps. A profile without a
propagation measurement says so: ``recurrences == {}``, ``horizon is None``.
"""

from __future__ import annotations

import math
import zlib

__all__ = [
    "COMPLEMENT_PROBES",
    "EXACT_DIM",
    "PROBED",
    "RENORM_EVERY",
    "REPLAY_FREE",
    "REPLAY_SHARE",
    "REPLAY_SHARE_OF_TRAINING",
    "SMALL_MATMUL_PENALTY",
    "replay_every",
    "seed_for",
    "sweep_vectors",
]

#: Sequences of the batch whose propagation is measured (the first ones, user order).
PROBED = 8
#: State dimensions up to which the Jacobian product is carried whole (exact).
EXACT_DIM = 16
#: Random probes for the part orthogonal to the dominant directions, over all the probed
#: sequences together: ceil(16 / P) per sequence, at least 2.
COMPLEMENT_PROBES = 16
#: Probe vectors are rescaled every this many steps (the scale kept in log), so a vanishing
#: or exploding product never underflows or overflows float32.
RENORM_EVERY = 8
#: A replay adds at most this share to the profiled steps it runs on, on average...
REPLAY_SHARE = 0.05
#: ... or, when profiles are spaced (``profile_every`` > 1), this share of the whole
#: training time, whichever allows more: with the default ``profile_every=10`` a replay of
#: up to 0.15 training step runs on every profiled step (1.5%, inside the defaults' 2%).
REPLAY_SHARE_OF_TRAINING = 0.015
#: Replays cheaper than this (flops) run on every profiled step.
REPLAY_FREE = 5e7
#: Small matrix products (a few probe vectors at a time) run at about a third of the speed
#: of a training step's large ones: the sweeps' flops count triple in a cost estimate.
SMALL_MATMUL_PENALTY = 3.0


def complement_probes(sequences: int) -> int:
    """Random complement probes per sequence of an estimate."""
    return max(2, -(-COMPLEMENT_PROBES // max(int(sequences), 1)))


#: The tangents' start offsets: 1, 4, 16, then doubling (32, 64, ...) up to the whole
#: sequence. One random start carried forward m steps is one half power iteration on the
#: m-step product: tight for j close to m only where the spectrum has a gap, so the
#: offsets are denser where products are long enough to matter and short enough not to
#: have converged (a 512-state LSTM at j = 30 with offsets 16 and 64 only: 0.81 of exact).
DOMINANT_SHORT = (1, 4, 16)


def dominant_starts(steps: int) -> list[int]:
    """Forward offsets (steps before the last) at which random tangents start, each carried
    forward to s_T: 1, 4, 16, 32, 64, ... and the whole sequence. Tangent k finds the
    dominant left direction of ds_T/ds_{T-j} for j near its offset (a long product's
    converges, so few are needed for large j; the short ones get extra power iterations)."""
    out = [k for k in DOMINANT_SHORT if k < steps - 1]
    k = 2 * DOMINANT_SHORT[-1]
    while k < steps - 1:
        out.append(k)
        k *= 2
    out.append(steps - 1)
    return out


def sweep_vectors(dim: int, sequences: int, steps: int) -> int:
    """Vectors carried per sequence by a replay's backward sweep (its cost driver)."""
    if dim <= EXACT_DIM:
        return dim
    return len(dominant_starts(steps)) + complement_probes(sequences)


def replay_every(replay_flops: float, step_flops: float, profile_every: int = 1) -> int:
    """Replay on every n-th profiled step: the smallest n for which one replay stays under
    ``REPLAY_SHARE`` of the profiled steps or ``REPLAY_SHARE_OF_TRAINING`` of all steps
    (profiles ``profile_every`` steps apart), whichever is larger, against a training step
    estimated at ``step_flops``. A replay under ``REPLAY_FREE`` flops always runs."""
    if replay_flops <= REPLAY_FREE:
        return 1
    share = max(REPLAY_SHARE, REPLAY_SHARE_OF_TRAINING * max(int(profile_every), 1))
    return max(1, math.ceil(replay_flops / (share * max(step_flops, 1.0)) - 1e-9))


def seed_for(name: str, step: int) -> int:
    """The probe generator's seed for one layer at one step (reproducible, private: the
    user's random state is never consumed)."""
    return (zlib.crc32(name.encode()) * 1_000_003 + step) % (2**63)
