"""Issue 17's cost targets, measured as same-process interleaved ratios.

Run: ``python -m benchmarks.modern_cost [--steps N] [--threads N]`` (torch, mambapy,
mingru-pytorch installed). Two parts, one line each:

* diagonal recurrences (mambapy, minGRU) on every profiled step (``profile_every=1``), at
  batch 16 and 64: steps with the diagonal probes' propagation on and off alternate on one
  watched model (the forward hook swapped for a no-op on the "off" steps), so the ratio
  is the propagation's own cost; beside it, the hook's measured time over the step;
* a hand-written GRU-like cell driven in a Python loop (T = 50, B = 32), state 128 and
  256 (above ``LOOP_EXACT_DIM``): what one probe replay would cost if it ran (the limit
  raised for this measurement only: time of the replay over the training step), and a
  watched model with the defaults against an unwatched copy, steps alternating.

Timings on a shared CPU are noisy: read the medians' ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradwatch_torch
from gradwatch_torch import _loops, _modern


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0


def _timed(cls: type, name: str, spent: list[float]) -> Callable[[], None]:
    real = getattr(cls, name)

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(cls, name, timed)
    return lambda: setattr(cls, name, real)


def diagonal(label: str, model: nn.Module, x: torch.Tensor, steps: int) -> str:
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=[])
    spent = [0.0]
    on, off, share = [], [], []
    undo = _timed(_modern.DiagonalProbe, "forward_hook", spent)
    timed = _modern.DiagonalProbe.forward_hook
    try:
        for _ in range(2):
            _step(model, opt, x)
        for _ in range(steps):
            spent[0] = 0.0
            t = _step(model, opt, x)
            on.append(t)
            share.append(spent[0] / t)
            _modern.DiagonalProbe.forward_hook = lambda *a, **k: None  # type: ignore[method-assign]
            off.append(_step(model, opt, x))
            _modern.DiagonalProbe.forward_hook = timed  # type: ignore[method-assign]
    finally:
        undo()
        w.close()
    ratio = statistics.median(on) / statistics.median(off)
    return (
        f"{label}: propagation on/off {ratio:.4f}x; hook {100 * statistics.median(share):.2f}% of the step "
        f"({statistics.median(on) * 1e3:.1f} ms a step)"
    )


class GRULike(nn.Module):
    """A hand-written GRU-like cell: z, r gates and a candidate, h' = (1 - z) h + z h~."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.x2h, self.h2zr, self.h2c = nn.Linear(d_in, 3 * d), nn.Linear(d, 2 * d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xz, xr, xc = self.x2h(x).chunk(3, -1)
        hz, hr = self.h2zr(h).chunk(2, -1)
        z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
        return (1 - z) * h + z * torch.tanh(xc + self.h2c(r * h))


class Looped(nn.Module):
    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.cell, self.d = GRULike(d_in, d), d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.d)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


def loop_cell(d: int, steps: int, batch: int = 32, length: int = 50) -> str:
    torch.manual_seed(0)
    x = torch.randn(batch, length, 16)
    # the defaults: a watched model against an unwatched copy, steps alternating
    watched = Looped(16, d)
    plain = copy.deepcopy(watched)
    opt_w, opt_p = torch.optim.SGD(watched.parameters(), lr=1e-5), torch.optim.SGD(plain.parameters(), lr=1e-5)
    w = gradwatch_torch.watch(watched, opt_w, sinks=[])
    tw, tp, tn = [], [], []
    hooks = (_loops.LoopProbe.pre_hook, _loops.LoopProbe.forward_hook)
    try:
        for _ in range(2):
            _step(watched, opt_w, x), _step(plain, opt_p, x)
        for _ in range(steps):
            tw.append(_step(watched, opt_w, x))
            tp.append(_step(plain, opt_p, x))
            _loops.LoopProbe.pre_hook = _loops.LoopProbe.forward_hook = lambda *a, **k: None  # type: ignore[method-assign]
            tn.append(_step(watched, opt_w, x))
            _loops.LoopProbe.pre_hook, _loops.LoopProbe.forward_hook = hooks  # type: ignore[method-assign]
    finally:
        _loops.LoopProbe.pre_hook, _loops.LoopProbe.forward_hook = hooks  # type: ignore[method-assign]
        w.close()
    # one probe replay, as if the state limit allowed it (a fresh watch: step 1 replays)
    was, _loops.LOOP_EXACT_DIM = _loops.LOOP_EXACT_DIM, 10**6
    spent = [0.0]
    undo = _timed(_loops.LoopProbe, "_replay", spent)
    replay = []
    try:
        for _ in range(2):
            w = gradwatch_torch.watch(plain, opt_p, profile_every=1, sinks=[])
            spent[0] = 0.0
            _step(plain, opt_p, x)
            replay.append(spent[0])
            w.close()
    finally:
        undo()
        _loops.LOOP_EXACT_DIM = was
    r, s = min(replay), statistics.median(tp)
    return (
        f"GRU-like cell, state {d}, B {batch}, T {length}: one replay (if allowed) {r * 1e3:.0f} ms = {r / s:.1f} "
        f"training steps ({s * 1e3:.1f} ms); defaults (profile_every=10; state > {was}: not replayed) "
        f"watched/unwatched {statistics.median(tw) / s:.4f}x, loop probe on/off {statistics.median(tw) / statistics.median(tn):.4f}x "
        f"over {steps} alternating steps"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", choices=("diagonal", "loop"), default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only in (None, "diagonal"):
        from mambapy.mamba import Mamba, MambaConfig
        from minGRU_pytorch import minGRU

        for batch in args.batches:
            model = Mamba(MambaConfig(d_model=64, n_layers=2, d_state=16))
            print(diagonal(f"mambapy 2 layers d_model 64 d_state 16, B {batch}, T 128", model, torch.randn(batch, 128, 64), args.steps), flush=True)
        for batch in args.batches:
            model = nn.Sequential(minGRU(128), minGRU(128))
            print(diagonal(f"minGRU x2 dim 128, B {batch}, T 128", model, torch.randn(batch, 128, 128), args.steps), flush=True)
    if args.only in (None, "loop"):
        for d in (128, 256):
            print(loop_cell(d, args.steps), flush=True)


if __name__ == "__main__":
    main()
