"""Helpers of the torch backend tests (small models, snapshots), imported by test modules."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn


class SeqRegressor(nn.Module):
    """A recurrent layer and a linear head, loss on every timestep."""

    def __init__(self, cls=nn.LSTM, inp=4, hidden=8, **kw) -> None:
        super().__init__()
        self.rnn = cls(inp, hidden, **kw)
        d = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(hidden * d, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        if isinstance(out, nn.utils.rnn.PackedSequence):
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.rnn.batch_first)
        return self.head(out).square().mean()


class LastStep(nn.Module):
    """A recurrent layer whose loss uses only the last timestep (the setting of the gradient-flow measurements: the loss sees h_T only)."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[-1]).square().mean()


def snapshot(model: nn.Module) -> list:
    return [p.detach().clone() for p in model.parameters()]


def optimizer_state_snapshot(opt) -> list:
    out = []
    for state in opt.state.values():
        out.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    return out


def states_equal(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if torch.is_tensor(x[k]):
                if not torch.equal(x[k], y[k]):
                    return False
            elif x[k] != y[k]:
                return False
    return True
