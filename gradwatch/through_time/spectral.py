"""Largest singular value of recurrent-kernel blocks on the host (numpy), tracked across
profiled steps: the spectral norms of backends whose step cannot hold the iteration
cheaply (Keras on JAX, where the jitted step only keeps the kernel for the host, and on
torch, where the host knows which steps are profiled).

sigma_max of each gate block is the quantity of Pascanu et al. (2013)'s conditions for
vanishing (< 1/gamma) and exploding (> 1) gradients; the alerts quote it, so it must be
right at every profiled step however far the weights moved since the last one (API.md:
within 1% of ``numpy.linalg.norm(block, 2)``).

How: a block whose smaller side is at most :data:`EXACT_BELOW` gets the exact value (an
SVD: well under a millisecond there). A larger one runs Lanczos on ``W^T W`` with full
reorthogonalisation, started from the previous profile's top right singular vector mixed
with a fresh random direction (seeded by the call count: the user's random streams are not
touched), and stops after at least four steps when the top Ritz value's residual bound
puts it within ``tol`` (relative) of an eigenvalue, i.e. sigma within ``tol / 2`` of a
singular value. A Ritz value never exceeds sigma_max^2, so the estimate can only err low,
and only by landing on another singular value; the random part of the start brings a
direction that overtook the previous top one into the Krylov space. Without convergence
in ``max_iter`` steps the block gets the exact value. The same method as PyTorch's
on-device tracker (``gradwatch_torch._spectral``), here one block at a time in float64.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EXACT_BELOW", "HostSpectral"]

#: Blocks whose smaller side is at most this get the exact SVD value.
EXACT_BELOW = 64
_MIN_STEPS = 4


class HostSpectral:
    """sigma_max of named blocks, each tracked from its previous top singular vector."""

    def __init__(self, tol: float = 2e-3, max_iter: int = 64) -> None:
        if not 0 < tol < 0.1 or max_iter < 2:
            raise ValueError("HostSpectral needs 0 < tol < 0.1 and max_iter >= 2")
        self.tol = tol
        self.max_iter = max_iter
        self._vectors: dict[str, np.ndarray] = {}
        self.calls = 0
        self.last_iterations = 0  # Lanczos steps the last call took (0: exact)

    def __call__(self, name: str, block: np.ndarray) -> float:
        """sigma_max of ``block`` (2-D); NaN when it holds NaN or Inf."""
        w = np.asarray(block, dtype=np.float64)
        if w.ndim != 2 or w.size == 0:
            raise ValueError(f"HostSpectral: block {name!r} must be a non-empty matrix, got shape {w.shape}")
        if not np.isfinite(w).all():
            return math.nan
        self.calls += 1
        self.last_iterations = 0
        if min(w.shape) <= EXACT_BELOW:
            return float(np.linalg.norm(w, 2))
        got, vector, steps = self._lanczos(w, self._start(name, w.shape[1]))
        self.last_iterations = steps
        if got is None:
            return float(np.linalg.norm(w, 2))
        self._vectors[name] = vector
        return got

    def _start(self, name: str, p: int) -> np.ndarray:
        r = np.random.default_rng(self.calls).standard_normal(p)
        r /= np.linalg.norm(r)
        v = self._vectors.get(name)
        if v is None or v.shape != (p,):
            return r
        q = v + 0.3 * r  # mostly the previous top vector, enough of a new random one
        return q / max(float(np.linalg.norm(q)), 1e-30)

    def _lanczos(self, w: np.ndarray, start: np.ndarray) -> tuple[float | None, np.ndarray, int]:
        p = w.shape[1]
        k_max = min(self.max_iter, p)
        basis = np.zeros((k_max + 1, p))
        basis[0] = start
        alpha, beta = np.zeros(k_max), np.zeros(k_max)
        for j in range(k_max):
            q = basis[j]
            z = w.T @ (w @ q)
            alpha[j] = z @ q
            seen = basis[: j + 1]
            for _ in range(2):  # full reorthogonalisation (twice is enough)
                z = z - seen.T @ (seen @ z)
            b = float(np.linalg.norm(z))
            beta[j] = b
            basis[j + 1] = z / max(b, 1e-30)
            k = j + 1
            if k >= _MIN_STEPS or k == k_max:
                tri = np.diag(alpha[:k]) + np.diag(beta[: k - 1], 1) + np.diag(beta[: k - 1], -1)
                vals, vecs = np.linalg.eigh(tri)
                theta = max(float(vals[-1]), 0.0)
                resid = b * abs(float(vecs[-1, -1]))
                if k >= p or resid <= self.tol * max(theta, 1e-30):
                    ritz = vecs[:, -1] @ basis[:k]
                    return math.sqrt(theta), ritz / max(float(np.linalg.norm(ritz)), 1e-30), k
        return None, start, k_max
