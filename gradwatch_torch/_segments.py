"""A step's statistics as flat, checked segments of the one host copy.

What the recurrent probes hand back is checked here, one measurement at a time (a real
floating-point tensor of the size its segment declares), so that a malformed result
fails its own measurement (:meth:`TorchAttachment._optional` turns it off alone), never
the step's single copy and with it every record.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from gradwatch_torch._recurrent import Probe, SequenceProbe

__all__ = ["cat_to", "flat", "gates_of", "propagation_of", "spectral_of", "temporal_of"]


def cat_to(device: torch.device, dtype: torch.dtype) -> Any:
    """The ``concat`` of :meth:`gradwatch.Layout.pack`: every part flat, on ``device``."""

    def concat(parts: list[Tensor]) -> Tensor:
        # float64 as soon as one part is (the per-timestep squared norms of a vanishing
        # profile): cast to float32 they would underflow to exact zeros.
        wide = torch.float64 if any(p.dtype == torch.float64 for p in parts) else dtype
        return torch.cat([p.reshape(-1).to(device=device, dtype=wide) for p in parts])

    return concat


def flat(t: Tensor | None, size: int | None = None) -> Tensor | None:
    """A probe's tensor as one flat segment, checked here so that a malformed one fails its
    own measurement, not the step's copy. None (nothing this step) stays None."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"expected a real floating-point tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
    out = t.detach().reshape(-1)
    if size is not None and out.numel() != size:
        raise ValueError(f"expected {size} values, got {out.numel()}")
    return out


def temporal_of(probe: Probe) -> Tensor | None:
    return flat(probe.take_temporal())


def gates_of(probe: Probe) -> Tensor | None:
    return flat(probe.take_gates(), 2)


def spectral_of(probe: SequenceProbe) -> list[tuple[str, tuple[str, ...], Tensor]]:
    return [(w, labels, cast(Tensor, flat(t, len(labels)))) for w, labels, t in probe.spectral()]


def propagation_of(probe: Probe) -> tuple[tuple[str, ...], Tensor] | None:
    """Propagation gains: R recurrences of T gains each."""
    got = probe.take_propagation()
    if got is None:
        return None
    labels, gains = got[0], got[1]  # (labels, gains, max_gains): max_gains travels once attach has its segment
    gains_flat = cast(Tensor, flat(gains))
    if not labels or gains_flat.numel() % len(labels):
        raise ValueError(f"{gains_flat.numel()} gains cannot be split into the {len(labels)} recurrences {labels}")
    return tuple(labels), gains_flat
