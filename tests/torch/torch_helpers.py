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


def run_ranks(cmd: list, *, cwd, env: dict | None = None, timeout: float = 240):
    """Run a multi-process (gloo) worker script, once more if the first try fails.

    Two things outside the code under test make a gloo run fail now and then on a loaded
    2-core machine: the free port the parent picked is taken before the ranks bind it, and
    a rank aborts in gloo's teardown ("terminate called without an active exception",
    SIGABRT) after its work is done. A second failure is a real one: both tries' stderr
    are shown."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, *map(str, cmd)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        first = proc.stderr[-2000:]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, env=env, cwd=cwd)
        assert proc.returncode == 0, first + "\n--- retry ---\n" + proc.stderr[-3000:]
    return proc
