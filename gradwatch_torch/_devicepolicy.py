"""A core clipping policy run on the device, its state in tensors (no host read).

The policies of :mod:`gradwatch.policies` are pure functions over an array-ops layer;
run with :data:`gradwatch_torch._tensors.TORCH` on device tensors they decide the clip of a
step without bringing anything to the host, as ``gradwatch_tf._step.DevicePolicy`` does in
TensorFlow. The monitor hands its state over with ``monitor.decide_on_device(runner)``
(and takes it back with ``None``); ``state_dict`` / ``load_state_dict`` use the policy's
own format, so a state saved by either side loads in the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch.clipping import ClipStats
from gradwatch_torch._tensors import TORCH

__all__ = ["TorchDevicePolicy", "global_norm"]


def global_norm(norms: Tensor) -> Tensor:
    """The global norm on the device, as the monitor computes it on the host (float64 sum
    of the squared norms; absent parameters are 0 in ``norms``)."""
    return norms.to(torch.float64).square().sum().sqrt()


class TorchDevicePolicy:
    """Runs ``policy`` on ``device``; the state is a dataclass of tensors there."""

    def __init__(self, policy: Any, device: torch.device) -> None:
        self.policy = policy
        self.device = device
        init = policy.init()
        if not dataclasses.is_dataclass(init):
            raise TypeError(f"policy {policy!r} keeps its state in a {type(init).__name__}, not a dataclass")
        self._cls = type(init)
        self.state = self._to_device(init)
        with torch.no_grad():  # a policy that cannot run on torch ops fails here, not mid-training
            clip, _ = policy.update(ClipStats(torch.ones((), dtype=torch.float64, device=device)), self.state, TORCH)
            torch.as_tensor(clip.threshold), torch.as_tensor(clip.scale)

    @staticmethod
    def supports(policy: Any) -> bool:
        return policy is not None and not getattr(policy, "unitwise", False) and dataclasses.is_dataclass(policy.init())

    def _to_device(self, state: Any) -> Any:
        fields = {f.name: torch.as_tensor(np.asarray(getattr(state, f.name)), device=self.device) for f in dataclasses.fields(state)}
        return self._cls(**fields)

    def run(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """(threshold, scale), float64 scalars on the device; the state moves on."""
        with torch.no_grad():
            clip, self.state = self.policy.update(ClipStats(norm), self.state, TORCH)
            thr, scale = self._on_device(clip.threshold), self._on_device(clip.scale)
        return thr, scale

    def _on_device(self, x: Any) -> Tensor:
        """A float64 scalar on the device. A constant the policy made on the CPU (FixedNorm's
        threshold) is filled in on the device from its host value: a copy from pageable
        host memory would synchronise the stream."""
        t = torch.as_tensor(x)
        if t.device != self.device:
            return torch.full((), float(t), dtype=torch.float64, device=self.device)
        return t.to(torch.float64)

    def state_dict(self) -> dict[str, Any]:
        host = self._cls(**{f.name: getattr(self.state, f.name).cpu().numpy() for f in dataclasses.fields(self.state)})
        return self.policy.dump_state(host)  # type: ignore[no-any-return]

    def load_state_dict(self, state: Any) -> None:
        self.state = self._to_device(self.policy.load_state(state))
