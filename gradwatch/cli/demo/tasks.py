"""The demo's long-range task, in numpy so both frameworks train on the same data.

Each sequence has ``length`` timesteps of one feature. The first timestep holds the
label's sign (+1 or -1); every later timestep is Gaussian noise. The label is 1 when the
first input is positive. To do better than chance a model must carry one number across
all ``length - 1`` noisy steps, and to *learn* that, the gradient of the loss (taken at
the last step) must reach the first timestep: exactly what vanishes in a vanilla RNN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SEQ_LEN", "FirstSignTask"]

#: Sequence length of the demo (the issue's "sequences of length 100").
SEQ_LEN = 100


@dataclass(frozen=True)
class FirstSignTask:
    """Batches of the first-sign task from a seeded generator (reproducible runs)."""

    length: int = SEQ_LEN
    noise: float = 1.0

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``x`` of shape (size, length, 1) float32 and labels ``y`` (size,) float32 in {0, 1}."""
        x = rng.standard_normal((size, self.length, 1)).astype(np.float32) * np.float32(self.noise)
        sign = rng.integers(0, 2, size=size).astype(np.float32) * 2 - 1
        x[:, 0, 0] = sign
        return x, (sign > 0).astype(np.float32)

    def describe(self) -> str:
        return (
            f"sequences of {self.length} timesteps; the label is the sign of the first input, "
            f"the other {self.length - 1} inputs are Gaussian noise (std {self.noise:g})"
        )
