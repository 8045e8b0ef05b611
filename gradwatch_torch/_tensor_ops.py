"""The through-time engine's :class:`~gradwatch.through_time.ops.TensorOps` on torch tensors,
so the core's shared rules (the aggregate over probed sequences, diagonal recurrences) run
on the device with no host copy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TORCH_TENSORS", "TorchTensors"]


class TorchTensors:
    name = "torch"

    def exp(self, x: Tensor) -> Tensor:
        return torch.exp(x)

    def log(self, x: Tensor) -> Tensor:
        return torch.log(x)

    def sort(self, x: Tensor, axis: int) -> Tensor:
        return torch.sort(x, dim=axis).values

    def amax(self, x: Tensor, axis: int) -> Tensor:
        return torch.amax(x, dim=axis)

    def cumsum(self, x: Tensor, axis: int) -> Tensor:
        return torch.cumsum(x, dim=axis)

    def flip(self, x: Tensor, axis: int) -> Tensor:
        return torch.flip(x, dims=(axis,))

    def logsumexp(self, x: Tensor, axis: int) -> Tensor:
        return torch.logsumexp(x, dim=axis)

    def where(self, cond: Any, a: Any, b: Any) -> Tensor:
        return torch.where(cond, a, b)

    def concat(self, xs: list[Tensor], axis: int) -> Tensor:
        return torch.cat(xs, dim=axis)

    def zeros_like(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


TORCH_TENSORS = TorchTensors()
