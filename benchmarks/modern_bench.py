"""Cost of the modern recurrences' propagation (diagonal decays, loop cells), on every
profiled step (``profile_every=1``).

Run: ``python -m benchmarks.modern_bench`` (torch, mambapy, mingru-pytorch installed).
For each model: the time spent in the probes' propagation (the diagonal probe's forward
hook; the loop probe's replay) against the training step it runs in, and the same-process
interleaved ratio of a watched step (profile_every=1) with and without the probes'
propagation. Prints one line per model.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import gradwatch_torch
from gradwatch_torch import _loops, _modern


class _Timer:
    def __init__(self) -> None:
        self.spent = 0.0

    def wrap(self, cls: type, name: str) -> None:
        real = getattr(cls, name)
        timer = self

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                timer.spent += time.perf_counter() - t0

        setattr(cls, name, timed)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    out: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    try:
        from mambapy.mamba import Mamba, MambaConfig

        out["mambapy 2 layers d_model 64 d_state 16, B 16, T 128"] = (
            Mamba(MambaConfig(d_model=64, n_layers=2, d_state=16)),
            torch.randn(16, 128, 64),
        )
    except ImportError:
        pass
    try:
        from minGRU_pytorch import minGRU

        out["minGRU x2 dim 128, B 32, T 128"] = (nn.Sequential(minGRU(128), minGRU(128)), torch.randn(32, 128, 128))
    except ImportError:
        pass

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.u = nn.Linear(16, 32), nn.Linear(32, 32)

        def forward(self, x, h):
            return torch.tanh(self.w(x) + self.u(h))

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = Cell()

        def forward(self, x):
            h = torch.zeros(x.shape[0], 32)
            outs = []
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
                outs.append(h)
            return torch.stack(outs, 1)

    out["user tanh cell 32 in a loop, B 32, T 100"] = (Looped(), torch.randn(32, 100, 16))
    return out


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def main(steps: int = 12) -> None:
    timer = _Timer()
    timer.wrap(_modern.DiagonalProbe, "forward_hook")
    timer.wrap(_loops.LoopProbe, "_replay")
    for label, (model, x) in _models().items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for _ in range(2):
            _step(model, opt, x)  # warm-up
        plain, watched, spent = [], [], []
        w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=[])
        for _ in range(steps):
            t0 = time.perf_counter()
            timer.spent = 0.0
            _step(model, opt, x)
            watched.append(time.perf_counter() - t0)
            spent.append(timer.spent)
        w.close()
        for _ in range(steps):
            t0 = time.perf_counter()
            _step(model, opt, x)
            plain.append(time.perf_counter() - t0)
        share = statistics.median(s / t for s, t in zip(spent, watched))
        print(
            f"{label}: propagation {statistics.median(spent) * 1e3:.2f} ms a step = {100 * share:.2f}% of a watched "
            f"training step ({statistics.median(watched) * 1e3:.1f} ms; unwatched {statistics.median(plain) * 1e3:.1f} ms)"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
