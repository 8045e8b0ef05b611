"""Many small gradients measured in a few operations, whatever their number (issue 20).

``_foreach_norm`` on many small tensors costs a fixed few microseconds of dispatch per
tensor on the CPU (about 3 ms for 2,000 tensors, where one norm over a flat buffer of the
same values takes 0.1 ms), and ``clip_grad_norm_`` pays it twice. :class:`FusedPlan` copies
the small gradients (at most :data:`FUSE_MAX_NUMEL` elements) into one flat buffer, kept
from step to step, with one ``torch.cat(..., out=)`` per distinct shape (no view per
tensor, no allocation per step: on the CPU a fresh multi-megabyte buffer costs page
faults), and reduces each shape's block with one ``vector_norm`` over its rows. A model
repeats a few shapes, so a step is two operations per shape. The large gradients, few by
construction, go to one ``_foreach_norm`` (no copy of them). Norms are computed as the
tensors' own ``norm`` computes them, so a NaN or Inf in a gradient makes its norm
non-finite: the norm is the finiteness check, no second pass.

Built once per bound parameter set (:class:`gradwatch_torch._tensors.GradGroups`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["FUSE_MAX_NUMEL", "FUSE_MIN_TENSORS", "KEEP_MAX_NUMEL", "FusedPlan"]

#: Gradients of at most this many elements are measured through the flat buffer; larger
#: ones by ``_foreach_norm``, which reads them in place.
FUSE_MAX_NUMEL = 1 << 16
#: Fewer small gradients than this in a group: ``_foreach_norm`` alone is as cheap.
FUSE_MIN_TENSORS = 16
#: The flat buffer is kept between steps up to this many elements (64 MB of float32);
#: above, it is allocated at each step and freed, as a transient.
KEEP_MAX_NUMEL = 1 << 24


def _picker(idx: list[int]) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """``grads -> [grads[i] for i in idx]`` in C (``itemgetter``), a list always."""
    if len(idx) == 1:
        i = idx[0]
        return lambda grads: [grads[i]]
    get = operator.itemgetter(*idx)
    return lambda grads: list(get(grads))


class _Block:
    """The small gradients of one shape: where they go in the flat buffer."""

    def __init__(self, idx: list[int], shape: tuple[int, ...], start: int) -> None:
        self.pick = _picker(idx)
        self.count = len(idx)
        self.numel = 1
        for s in shape:
            self.numel *= s
        self.start = start
        self.stop = start + self.count * self.numel
        #: cat along dim 0 of same-shape tensors: each tensor is a contiguous run of rows.
        self.cat_shape = (self.count * shape[0], *shape[1:])


class FusedPlan:
    """How one (device, dtype) group is measured in a few operations (see the module)."""

    def __init__(self, params: Sequence[Tensor], device: torch.device) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        self.big: list[int] = []
        for i, p in enumerate(params):
            if p.ndim >= 1 and p.numel() <= FUSE_MAX_NUMEL:
                by_shape.setdefault(tuple(p.shape), []).append(i)
            else:  # large, or 0-dim (cat needs a dimension): few, measured in place
                self.big.append(i)
        self.pick_big = _picker(self.big) if self.big else None
        self.blocks: list[_Block] = []
        start = 0
        for shape, idx in by_shape.items():
            block = _Block(idx, shape, start)
            self.blocks.append(block)
            start = block.stop
        self.total = start
        self.dtype = params[0].dtype
        self.device = device
        self._buf: Tensor | None = None
        order = self.big + [i for idx in by_shape.values() for i in idx]  # the order the norms come out in
        inv = [0] * len(order)
        for pos, i in enumerate(order):
            inv[i] = pos
        self.inverse = None if order == list(range(len(order))) else torch.tensor(inv, device=device)

    @staticmethod
    def worth_it(params: Sequence[Tensor]) -> bool:
        p0 = params[0]
        if not p0.is_floating_point() or p0.layout != torch.strided:
            return False
        small = [p for p in params if p.ndim >= 1 and p.numel() <= FUSE_MAX_NUMEL]
        distinct = len({tuple(p.shape) for p in small})
        return len(small) >= FUSE_MIN_TENSORS and distinct <= max(8, len(small) // 8)

    def _buffer(self) -> Tensor:
        buf = self._buf
        if buf is None:
            buf = torch.empty(self.total, dtype=self.dtype, device=self.device)
            if self.total <= KEEP_MAX_NUMEL:
                self._buf = buf
        return buf

    def norms(self, grads: Sequence[Tensor], dtype: torch.dtype | None) -> Tensor:
        """The L2 norm of each of ``grads`` (all present, in the bound order), computed in
        ``dtype`` where given (half precision in float32)."""
        parts: list[Tensor] = []
        if self.pick_big is not None:
            big = self.pick_big(grads)
            got = torch._foreach_norm(big, 2.0) if dtype is None or big[0].dtype == dtype else torch._foreach_norm(big, 2.0, dtype=dtype)
            parts.append(torch.stack(got).to(dtype or got[0].dtype))
        if self.blocks:
            buf = self._buffer()
            # dtype= only where it changes something (half precision): with it, a float32
            # row reduction takes another kernel path, 1000x slower on 2 threads here.
            cast = None if dtype is None or buf.dtype == dtype else dtype
            with torch.no_grad():  # a gradient of create_graph=True requires grad; out= refuses that
                for b in self.blocks:
                    flat = buf[b.start : b.stop]
                    torch.cat(b.pick(grads), out=flat.view(b.cat_shape))
                    rows = flat.view(b.count, b.numel)
                    parts.append(torch.linalg.vector_norm(rows, dim=1) if cast is None else torch.linalg.vector_norm(rows, dim=1, dtype=cast))
        vec = parts[0] if len(parts) == 1 else torch.cat(parts)
        return vec if self.inverse is None else vec[self.inverse]
