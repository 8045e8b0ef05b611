"""The probe of ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` driven in a Python loop.

The calls within one optimizer step are the timesteps, in call order: call t's input
gradient lands in slot t of the sensitivity profile whichever order backward visits them.

Propagation needs the recurrence itself. A loop is recognised when each call's state
``hx`` *is* the object the previous call returned (``h = cell(x[t], h)``, or
``h, c = cell(x[t], (h, c))``); a call whose ``hx`` is anything else (None, a fresh tensor,
the previous output after dropout or any other operation) starts a new chain, because
gradwatch cannot see what the user's code did to the state in between. On a replay step
the probed rows (the first ``min(B, 8)``) of each call's input and output are copied, and
at the optimizer step the longest chain of the step is replayed like one layer ("l0").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradwatch_torch._probing import (
    ProbeContext,
    outside_backward,
    probe_input,
    split_call,
    tolerance,
    with_input,
)
from gradwatch_torch._recurrent import MAX_CELL_REPLAY, MAX_CELL_STEPS, Probe, _on_backward
from gradwatch_torch._replay import replay
from gradwatch_torch._tensors import _profile_dtype
from gradwatch_torch._trajectory import PROBED, cell_trajectory, replay_flops

__all__ = ["CellProbe"]


class _Chain:
    """Consecutive calls linked through their state: probed rows of inputs and outputs."""

    __slots__ = ("c0", "h0", "hs", "trained", "xs")

    def __init__(self, h0: Tensor | None, c0: Tensor | None) -> None:
        self.h0, self.c0 = h0, c0
        self.xs: list[Tensor] = []
        self.hs: list[Tensor] = []
        #: Set when backward reaches one of the chain's outputs: a chain of an evaluation
        #: loop run with grad enabled (no backward) is never the one measured.
        self.trained = [False]


def _rows(t: Tensor | None, probed: int) -> Tensor | None:
    if t is None:
        return None
    return (t[:probed] if t.dim() > 1 else t).detach().clone()


class CellProbe(Probe):
    """Probe for a cell called once per timestep (see the module docstring)."""

    def __init__(self, name: str, module: nn.Module, ctx: ProbeContext) -> None:
        super().__init__(name, module, ctx)
        self._slots: list[Tensor | None] = []
        # True for calls made while backward recomputes a checkpointed forward: with
        # non-reentrant checkpointing their hooks never fire, and they are not timesteps.
        self._recomputed: list[bool] = []
        self._chains: list[_Chain] = []
        self._recorded = 0
        self._last_out: Any = None  # what the previous recorded call returned
        self._pending = False  # the current call is being recorded (its output is due)
        self._tol = 0.0  # the self-check's tolerance, decided during the forward
        self._replay_step: bool | None = None  # decided at the first call of a step
        self.recurrent_weights = ["weight_hh"]

    def _linked(self, hx: Any) -> bool:
        last = self._last_out
        if last is None or hx is None:
            return False
        if isinstance(last, tuple):
            return isinstance(hx, (tuple, list)) and len(hx) == len(last) and all(a is b for a, b in zip(hx, last))
        return hx is last

    def _record(self, module: nn.Module, x: Tensor, hx: Any) -> None:
        if self._replay_step is None:
            cell: Any = module
            batch = int(x.shape[0]) if x.dim() > 1 else 1
            flops = replay_flops(self.kind, 1, 1, cell.input_size, cell.hidden_size, cell.hidden_size, min(batch, PROBED), 1)
            self._replay_step = self._replay_due(flops, batch)
            self._replays += int(bool(self._replay_step))
        if not self._replay_step or self._recorded >= MAX_CELL_REPLAY or not outside_backward():
            return
        probed = min(int(x.shape[0]), PROBED) if x.dim() > 1 else 1
        if not self._linked(hx):
            h0, c0 = (hx[0], hx[1]) if isinstance(hx, (tuple, list)) else (hx, None)
            self._chains.append(_Chain(_rows(h0, probed), _rows(c0, probed)))
        self._chains[-1].xs.append(_rows(x, probed))  # type: ignore[arg-type]
        self._recorded += 1
        self._pending = True

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (torch.is_grad_enabled() and self._ctx.due()) or not self.enabled:
            return None
        split = split_call(args, kwargs)
        if split is None:
            return None
        x, hx, by_keyword = split
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        if self.on("replay"):
            try:
                self._record(module, x, hx)
            except Exception as exc:  # noqa: BLE001 - never break the forward pass
                self.fail("replay", exc)
        if not self.active() or len(self._slots) >= MAX_CELL_STEPS:
            return None
        try:
            t = len(self._slots)
            self._slots.append(None)
            self._recomputed.append(not outside_backward())
            new_x = probe_input(x, lambda g: self._on_grad(g, t))
            return with_input(args, kwargs, new_x, by_keyword)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("profile", exc)
            return None

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._pending:
            return
        self._pending = False
        try:
            h = output[0] if isinstance(output, tuple) else output
            chain = self._chains[-1]
            chain.hs.append(_rows(h, chain.xs[-1].shape[0] if chain.xs[-1].dim() > 1 else 1))  # type: ignore[arg-type]
            if not chain.trained[0]:
                _on_backward(output, chain.trained)
            self._last_out = output
            self._tol = max(self._tol, tolerance(h.dtype, h.device.type))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    def _on_grad(self, g: Tensor, t: int) -> None:
        if not self.on("profile"):
            return
        try:
            with torch.no_grad():
                sq = g.to(_profile_dtype(g)).square().sum()
                if t < len(self._slots):
                    prev = self._slots[t]
                    self._slots[t] = sq if prev is None else prev + sq
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("profile", exc)

    def _replay_chains(self) -> None:
        chains, self._chains = self._chains, []
        self._recorded, self._last_out, self._pending, self._replay_step = 0, None, False, None
        tol, self._tol = self._tol, 0.0
        module = self._module()
        full = [c for c in chains if len(c.hs) == len(c.xs) and len(c.hs) >= 2 and c.trained[0]]
        if module is None or not full or not self.on("replay"):
            return
        chain = max(full, key=lambda c: len(c.hs))  # the longest recurrence of the step
        try:
            dev = chain.xs[0].device.type
            with torch.no_grad(), torch.autocast(dev, enabled=False):
                tr = cell_trajectory(module, chain.xs, chain.hs, chain.h0, chain.c0)
                result = replay(tr, self._seeded())
            self._store(("l0",), [result], True, tol)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    def take_temporal(self) -> Tensor | None:
        self._replay_chains()
        slots, self._slots = self._slots, []
        recomputed, self._recomputed = self._recomputed, []
        self.rearm()
        slots = [s for s, r in zip(slots, recomputed) if s is not None or not r]
        got = [s for s in slots if s is not None]
        if not got or not self.on("profile"):
            return None
        zero = torch.zeros((), dtype=got[0].dtype, device=got[0].device)
        return torch.stack([s if s is not None else zero for s in slots])

    def close(self) -> None:
        super().close()
        self._chains, self._last_out, self._slots, self._recomputed = [], None, [], []
