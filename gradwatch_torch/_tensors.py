"""On-device maths for the PyTorch backend.

Everything here works on tensors and returns tensors: nothing in this module copies to the
host or branches on a device value, so a whole training step's statistics can be gathered
on the device and brought to the host with one copy (see :mod:`gradwatch_torch.attach`).
The maths mirrors the numpy reference in ``gradwatch._numerics`` and is tested against
``torch.autograd`` / ``torch.linalg``.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch_torch._fused import FUSE_MAX_NUMEL, FusedPlan

__all__ = [
    "FUSE_MAX_NUMEL",
    "TORCH",
    "GradGroups",
    "SpectralTracker",
    "TorchOps",
    "agc_factors",
    "apply_agc_",
    "packed_timestep_sq_norms",
    "scale_grads_",
    "timestep_sq_norms",
]


_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")

_DTYPES = {"float64": torch.float64, "int64": torch.int64, "bool": torch.bool}


class TorchOps:
    """:class:`gradwatch.ArrayOps` on torch tensors, so a policy defined once in the core
    runs on the device (AGC's unit factors today) without a host round trip."""

    name = "torch"

    def asarray(self, x: Any, dtype: str) -> Tensor:
        return torch.as_tensor(x, dtype=_DTYPES[dtype])

    def cast(self, x: Tensor, dtype: str) -> Tensor:
        return x.to(_DTYPES[dtype])

    def where(self, cond: Tensor, a: Any, b: Any) -> Tensor:
        return torch.where(cond, a, b)

    def minimum(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))

    def maximum(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))

    def sqrt(self, x: Tensor) -> Tensor:
        return torch.sqrt(x)

    def floor(self, x: Tensor) -> Tensor:
        return torch.floor(x)

    def isfinite(self, x: Tensor) -> Tensor:
        return torch.isfinite(torch.as_tensor(x))

    def ones_like(self, x: Tensor) -> Tensor:
        return torch.ones_like(x)

    def logical_and(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.logical_and(a, b)

    def logical_or(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.logical_or(a, b)

    def logical_not(self, a: Tensor) -> Tensor:
        return torch.logical_not(a)

    def equal(self, a: Any, b: Any) -> Tensor:
        return torch.eq(torch.as_tensor(a), torch.as_tensor(b))

    def sum(self, x: Tensor) -> Tensor:
        return torch.sum(x)

    def sort(self, x: Tensor) -> Tensor:
        return torch.sort(x).values

    def take(self, x: Tensor, i: Any) -> Tensor:
        # index_select, not x[i]: indexing with a 0-dim integer tensor reads it to the host
        if isinstance(i, Tensor):
            return x.index_select(0, i.reshape(1).to(torch.int64)).reshape(())
        return x[i]

    def put(self, x: Tensor, i: Any, v: Any) -> Tensor:
        return x.index_put((torch.as_tensor(i).reshape(1),), torch.as_tensor(v, dtype=x.dtype).reshape(1))


#: The torch implementation of the core's array-ops layer.
TORCH = TorchOps()


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a gradient's norm is computed in (None: its own, without a dtype argument).

    Half-precision gradients are reduced in float32: the sum of squares of fp16 values
    overflows fp16 long before the gradient itself is large (65504 is fp16's maximum).
    float64 stays float64 so a float64 model keeps its precision. Complex gradients are
    reduced as ``clip_grad_norm_`` reduces them, in their own precision: the norm of a
    complex tensor is real (sqrt of sum |z|^2), and torch refuses a real ``dtype=`` for a
    complex input.
    """
    if dtype.is_complex:
        return None
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local(t: Tensor | None) -> Tensor | None:
    """This rank's shard of a DTensor (the tensor itself otherwise); in-place changes to
    it are changes to the DTensor."""
    if t is None:
        return None
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@dataclass
class _Group:
    params: list[Tensor]
    positions: list[int]  # index of each param in the bound (named_parameters) order
    sparse: bool = False  # gradients may be sparse (nn.Embedding(sparse=True))
    fused: FusedPlan | None = None  # many small gradients: measured through one flat buffer


class GradGroups:
    """Parameters grouped by (device, dtype) once, when the parameter set is bound.

    ``torch._foreach_norm`` needs tensors of one device and dtype, exactly as
    ``clip_grad_norm_`` groups them; doing the grouping once keeps the per-step Python
    work to reading ``p.grad`` and ``p.requires_grad`` (re-read every step: autograd may
    replace the tensor, the user may freeze the parameter).

    A parameter is *present* at a step when it requires grad and has a gradient. Absent
    ones (frozen, or not reached by this step's loss) are measured as nothing: 0 in the
    norm vector, ``False`` in the presence mask, never scaled.
    """

    def __init__(self, params: Sequence[Tensor], local_shards: bool = False, sparse: Sequence[int] = ()) -> None:
        if not params:
            raise ValueError("GradGroups needs at least one parameter")
        self.params = list(params)
        #: FSDP2 (DTensor) parameters: measure and scale each rank's local shard; the
        #: caller all-reduces the squared norms.
        self.local_shards = local_shards
        sparse_set = set(sparse)
        groups: dict[tuple[torch.device, torch.dtype, bool], _Group] = {}
        for i, p in enumerate(self.params):
            is_sparse = i in sparse_set
            g = groups.setdefault((p.device, p.dtype, is_sparse), _Group([], [], is_sparse))
            g.params.append(p)
            g.positions.append(i)
        self.groups = list(groups.values())
        self.device = self.params[0].device
        for g in self.groups:
            if not g.sparse and FusedPlan.worth_it(g.params):
                g.fused = FusedPlan(g.params, g.params[0].device)
        wide = (torch.float64, torch.complex128)
        self.stat_dtype = torch.float64 if any(p.dtype in wide for p in self.params) else torch.float32
        order = [i for g in self.groups for i in g.positions]
        # Identity order (one group, the common case) needs no gather.
        self._inverse: Tensor | None = None
        if order != list(range(len(order))):
            inv = [0] * len(order)
            for k, i in enumerate(order):
                inv[i] = k
            self._inverse = torch.tensor(inv, device=self.device)

    def __len__(self) -> int:
        return len(self.params)

    def grads(self) -> list[list[Tensor | None]]:
        """This step's gradients, per group; ``None`` for an absent parameter.

        A parameter that does not require grad is absent even if a ``.grad`` is left on
        it: after ``requires_grad_(False)`` and ``zero_grad(set_to_none=False)`` that is
        a stale zero, not this step's gradient.
        """
        if self.local_shards:
            return [[_local(p.grad) if p.requires_grad else None for p in g.params] for g in self.groups]
        out: list[list[Tensor | None]] = []
        for g in self.groups:  # map/attrgetter: C loops, about half the cost of a comprehension
            grads = list(map(_GRAD, g.params))
            if not all(map(_REQUIRES_GRAD, g.params)):
                grads = [gr if p.requires_grad else None for p, gr in zip(g.params, grads)]
            out.append(grads)
        return out

    def present_grads(self, grads: list[list[Tensor | None]] | None = None) -> list[Tensor]:
        """The gradients that exist, flat (for in-place clipping; local shards for FSDP2).

        Pass the lists :meth:`grads` returned for the measured step, so exactly what was
        measured is scaled.
        """
        if grads is None:
            grads = self.grads()
        return [g for gl in grads for g in gl if g is not None]

    def scale_(self, grads: list[list[Tensor | None]], scale: Tensor) -> None:
        """Multiply the present gradients in place by ``scale`` (a device scalar), one
        ``_foreach_mul_`` per group, without a host read: the groups are the bound ones,
        so no per-step Python work per tensor beyond skipping absent ones."""
        for gl in grads:
            present = [g for g in gl if g is not None] if any(map(operator.is_, gl, itertools.repeat(None))) else gl
            if present:
                torch._foreach_mul_(present, scale.to(device=present[0].device, dtype=present[0].dtype))

    def norms(self, grads: list[list[Tensor | None]] | None = None) -> Tensor:
        """L2 norm of every parameter's gradient, in bound order (0 where absent)."""
        return self.measure(grads)[0]

    def measure(self, grads: list[list[Tensor | None]] | None = None) -> tuple[Tensor, np.ndarray | None]:
        """The norms (in bound order, on ``self.device``) and the presence mask (bool per
        bound parameter, in bound order; ``None`` when every parameter is present).

        One ``_foreach_norm`` per (device, dtype) group; half precision is reduced in
        float32, complex in its own precision. The mask costs nothing when every
        parameter is present (the count of present gradients per group tells).
        """
        if grads is None:
            grads = self.grads()
        parts: list[Tensor] = []
        absent: list[int] = []
        for group, gl in zip(self.groups, grads):
            present = [g for g in gl if g is not None] if any(map(operator.is_, gl, itertools.repeat(None))) else gl
            if len(present) != len(gl):
                absent.extend(pos for pos, g in zip(group.positions, gl) if g is None)
            if not present:
                parts.append(torch.zeros(len(gl), device=self.device, dtype=self.stat_dtype))
                continue
            dtype = _reduce_dtype(present[0].dtype)
            if group.fused is not None and len(present) == len(gl):
                parts.append(group.fused.norms(present, dtype).to(device=self.device, dtype=self.stat_dtype))
                continue
            if group.sparse:  # _foreach_norm has no sparse kernel; these are few (embeddings)
                got: list[Tensor] | tuple[Tensor, ...] = [_sparse_aware_norm(g, dtype) for g in present]
            elif dtype is None or present[0].dtype == dtype:
                got = torch._foreach_norm(present, 2.0)
            else:
                got = torch._foreach_norm(present, 2.0, dtype=dtype)
            if len(present) == len(gl):
                vec = torch.stack(got)
            else:
                it = iter(got)
                zero = torch.zeros((), device=got[0].device, dtype=got[0].dtype)
                vec = torch.stack([next(it) if g is not None else zero for g in gl])
            parts.append(vec.to(device=self.device, dtype=self.stat_dtype))
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self._inverse is not None:
            flat = flat[self._inverse]
        mask: np.ndarray | None = None
        if absent:
            mask = np.ones(len(self.params), dtype=bool)
            mask[absent] = False
        return flat, mask


def _sparse_aware_norm(g: Tensor, dtype: torch.dtype | None) -> Tensor:
    if g.is_sparse:
        g = g.coalesce().values()  # duplicates summed first, as the dense gradient would be
    return torch.linalg.vector_norm(g, dtype=dtype)


def scale_grads_(grads: list[Tensor], scale: float) -> None:
    """Multiply every gradient in place by ``scale``, one foreach call per (device, dtype).

    ``scale`` is the host float decided by the policy. A scale of exactly 1.0 changes
    nothing (x * 1.0 == x bitwise), so the multiply is skipped: that saves a pass over
    every gradient on the many steps where a policy does not clip.
    """
    if scale == 1.0 or not grads:
        return
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)
    for gl in by_key.values():
        torch._foreach_mul_(gl, scale)


def _unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit (axis 0) for ndim >= 2, the whole tensor's norm otherwise.

    Same convention as ``gradwatch._numerics.unitwise_norm(x, unit_axis=0)`` and as
    Brock et al. (2021): torch stores weights as (out, in, ...), so a unit is a row.
    Computed in float32 at least, for the same overflow reason as the norms.
    """
    dtype = _reduce_dtype(x.dtype)
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, dtype=dtype)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=dtype)


def agc_factors(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    policy: Any,
) -> tuple[list[Tensor | None], Tensor]:
    """Unit-wise clipping factors of ``policy`` (AGC), without touching the gradients.

    The unit norms are measured here, on the device (torch stores weights as
    ``(out, in, ...)``: a unit is a row); the factor is the policy's own
    ``unit_factor``, run with :data:`TORCH` ops (``torch.where``: no branch, no host
    sync). Returns the factors (broadcastable to each gradient) and the squared norm of
    each clipped gradient, so the monitor can report the decision before anything is
    modified (``on_nonfinite="raise"`` must raise before the gradients change).
    """
    factors: list[Tensor | None] = []
    sq: list[Tensor] = []
    device = params[0].device if params else torch.device("cpu")
    for p, g in zip(params, grads):
        if g is None:
            factors.append(None)
            sq.append(torch.zeros((), device=device))
            continue
        if g.is_sparse:  # left unclipped: unit norms of a sparse gradient are not implemented
            factors.append(None)
            sq.append(_sparse_aware_norm(g, torch.float32).square().to(device))
            continue
        g_norm = _unitwise_norm(g)
        factor = policy.unit_factor(_unitwise_norm(p.detach()), g_norm, TORCH)
        factors.append(factor)
        sq.append(((g_norm * factor) ** 2).sum().to(device=device, dtype=torch.float32))
    return factors, torch.stack(sq) if sq else torch.zeros(0)


def apply_agc_(grads: Sequence[Tensor | None], factors: Sequence[Tensor | None]) -> None:
    """Multiply each gradient in place by its unit-wise factor."""
    for g, f in zip(grads, factors):
        if g is not None and f is not None:
            g.mul_(f.to(g.dtype))


def _profile_dtype(t: Tensor) -> torch.dtype:
    """float64 for per-timestep sums of squares where the device has it.

    A vanishing profile is made of tiny gradients: an element of 1e-20 squares to 1e-40,
    below float32's normal range, so float32 sums would report exact zeros for
    timesteps whose gradient is small but not zero. Only profiled steps pay for this.
    """
    return torch.float32 if t.device.type == "mps" else torch.float64


def timestep_sq_norms(grad: Tensor, batch_first: bool) -> Tensor:
    """Squared L2 norm of ``grad`` over batch and features, per timestep.

    ``grad`` is (T, B, F), (B, T, F) with ``batch_first``, or (T, F) for an unbatched
    input. Returns (T,) in float64 (see :func:`_profile_dtype`).
    """
    g = grad.to(_profile_dtype(grad))
    if g.ndim == 2:
        return g.square().sum(dim=1)
    return g.square().sum(dim=(0, 2) if batch_first else (1, 2))


def packed_timestep_sq_norms(grad_data: Tensor, batch_sizes: Tensor) -> Tensor:
    """Per-timestep squared norm of a ``PackedSequence``'s data gradient.

    The packed rows of timestep t are the next ``batch_sizes[t]`` rows, so padding is
    never counted. ``batch_sizes`` lives on the CPU (PyTorch keeps it there), so the
    row-to-timestep index is built without a device sync; one ``index_add_`` sums.
    """
    g = grad_data.to(_profile_dtype(grad_data))
    rows = g.square().sum(dim=1)
    steps = torch.repeat_interleave(torch.arange(batch_sizes.shape[0]), batch_sizes.cpu())
    out = torch.zeros(batch_sizes.shape[0], dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, steps.to(rows.device), rows)


# The spectral norms of recurrent weights live in their own module; importable from here too.
from gradwatch_torch._spectral import SpectralTracker
