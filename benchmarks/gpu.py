"""gradwatch on a GPU: overhead beside the floor, and no host synchronisation on quiet steps.

Three models: W1 and W2 of :mod:`benchmarks.torch_bench`, and ``many`` (1,000
``nn.Linear(32, 32)`` in parallel: 2,000 parameter tensors, issue 20), each with Adam.
Arms, interleaved (each round runs every arm in a rotated order; ratios are per round to
the unwatched arm of that round, median over rounds):

- ``unwatched``; ``floor: one flat norm`` (unwatched + one ``vector_norm`` over one flat
  buffer holding every gradient, kept from the first step: the least a monitor can do);
  ``clip_grad_norm_``; ``gradwatch defaults``; ``gradwatch zclip``;
  ``gradwatch profile_every=1`` (every step profiled and read).

Each timed block of steps ends with ``torch.cuda.synchronize()`` (never inside it, so
gradwatch's quiet steps may run ahead as the unwatched loop does). Then, for gradwatch
defaults and zclip, the quiet steps 2..9 of a fresh watch run under
``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises, and the
table says which arm synchronised where.

``python -m benchmarks.gpu [--quick] [--rounds N] [--steps N] [--json PATH]``. On a
machine without CUDA it runs on the CPU as a smoke test (``--quick``: tiny sizes; the
sync check is then "n/a"). Full sizes on one GPU: about 2-3 minutes.
"""

from __future__ import annotations

import sys

for _name in ("tensorflow", "keras"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import argparse
import copy
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.harness import emit, rotated
from benchmarks.many_tensors import Many  # n nn.Linear(d, d) side by side: 2n small tensors
from benchmarks.torch_bench import workload

ARMS = ("unwatched", "floor: one flat norm", "clip_grad_norm_", "gradwatch defaults", "gradwatch zclip", "gradwatch profile_every=1")
WATCH_OPTIONS: dict[str, dict[str, Any]] = {
    "gradwatch defaults": {},
    "gradwatch zclip": {"policy": "zclip"},
    "gradwatch profile_every=1": {"profile_every": 1},
}



def many_workload(quick: bool) -> tuple[nn.Module, list, Callable, str]:
    n, d, batch = (20, 8, 4) if quick else (1000, 32, 16)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, d, generator=g), torch.randn(batch, d, generator=g)) for _ in range(4)]

    def loss_of(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    return Many(n, d), data, loss_of, f"{n} nn.Linear({d}, {d}) in parallel ({2 * n} tensors), batch {batch}, Adam."


class Runner:
    """One arm on one model: its own copy, its own Adam, the same batches."""

    def __init__(self, arm: str, base: nn.Module, data: list, loss_of: Callable, device: torch.device) -> None:
        import gradwatch

        self.model = copy.deepcopy(base).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.data = [(x.to(device), y.to(device)) for x, y in data]
        self.loss_of = loss_of
        self.arm = arm
        self.i = 0
        self.flat: torch.Tensor | None = None
        self.watch = gradwatch.watch(self.model, self.opt, sinks=[], **WATCH_OPTIONS[arm]) if arm in WATCH_OPTIONS else None

    def steps(self, n: int) -> None:
        model, opt = self.model, self.opt
        for _ in range(n):
            x, y = self.data[self.i % len(self.data)]
            self.i += 1
            opt.zero_grad(set_to_none=False)  # the floor's flat buffer stays the gradients' storage
            self.loss_of(model, x, y).backward()
            if self.arm == "clip_grad_norm_":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            elif self.arm == "floor: one flat norm":
                if self.flat is None:  # once: every gradient becomes a view of one buffer
                    params = [p for p in model.parameters() if p.grad is not None]
                    self.flat = torch.cat([p.grad.reshape(-1) for p in params])
                    offset = 0
                    for p in params:
                        p.grad = self.flat[offset : offset + p.numel()].view_as(p)
                        offset += p.numel()
                torch.linalg.vector_norm(self.flat)
            opt.step()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, quick: bool, device: torch.device, rounds: int, steps: int) -> dict[str, Any]:
    if name == "many":
        base, data, loss_of, desc = many_workload(quick)
    else:
        base, data, loss_of, desc = workload(name, quick)
    runners = {arm: Runner(arm, base, data, loss_of, device) for arm in ARMS}
    for r in runners.values():  # warm-up (cuDNN plans, allocator, step 1's profile)
        r.steps(1 if quick else 3)
    _sync(device)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for k in range(rounds):
        for arm in rotated(list(ARMS), k):
            _sync(device)
            t0 = time.perf_counter()
            runners[arm].steps(steps)
            _sync(device)
            times[arm].append((time.perf_counter() - t0) / steps)
    for r in runners.values():
        r.close()
    base_t = times["unwatched"]
    rows = {}
    for arm in ARMS:
        ratios = [t / b for t, b in zip(times[arm], base_t)]
        rows[arm] = {"ms": statistics.median(times[arm]) * 1e3, "ratio": statistics.median(ratios)}
    return {"model": name, "description": desc, "rows": rows, "sync": sync_check(base, data, loss_of, device)}


def sync_check(base: nn.Module, data: list, loss_of: Callable, device: torch.device) -> dict[str, str]:
    """Quiet steps 2..9 under ``set_sync_debug_mode("error")``: "none" or what synced."""
    out: dict[str, str] = {}
    for arm in ("gradwatch defaults", "gradwatch zclip"):
        if device.type != "cuda":
            out[arm] = "n/a (CPU)"
            continue
        r = Runner(arm, base, data, loss_of, device)
        try:
            r.steps(1)  # step 1: profiled, reads
            _sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                r.steps(8)  # steps 2..9: quiet
            finally:
                torch.cuda.set_sync_debug_mode(0)
            _sync(device)
            assert r.watch is not None and len(r.watch.records) == 9
            out[arm] = "none"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            out[arm] = f"SYNC: {type(exc).__name__} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
        finally:
            r.close()
    return out


def table(results: list[dict[str, Any]], device: str) -> str:
    lines = [f"device: {device}", "", "| model | arm | ms/step | ratio to unwatched | quiet-step syncs |", "| --- | --- | --- | --- | --- |"]
    for res in results:
        for arm, row in res["rows"].items():
            sync = res["sync"].get(arm, "")
            lines.append(f"| {res['model']} | {arm} | {row['ms']:.2f} | {row['ratio']:.3f} | {sync} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--models", default="W1,W2,many")
    p.add_argument("--json")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds = a.rounds or (2 if a.quick else 7)
    steps = a.steps or (3 if a.quick else 10)
    results = [time_model(m, a.quick, device, rounds, steps) for m in a.models.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(table(results, name))
    if a.json:
        emit(a.json, {"bench": "gpu", "device": name, "rounds": rounds, "steps": steps, "results": results})


if __name__ == "__main__":
    main()
