"""Many parameter tensors: gradwatch's per-step work beside the floor (issue 20).

Model: 1,000 ``nn.Linear(32, 32)`` in parallel (2,000 tensors, 1.06 M values), Adam.
Timed on the same gradients (each arm its own copy of the model, the same batch), the
arms interleaved (each repeat runs every arm once, in a rotated order), the minimum per
arm over repeats (robust on a shared machine: a burst of load hits every arm alike):

- ``floor``: one ``vector_norm`` over one flat buffer already holding every gradient;
- ``get_total_norm`` (foreach) and ``clip_grad_norm_`` (what users run today);
- ``gradwatch quiet step`` / ``gradwatch quiet step, zclip``: gradwatch's whole work on a
  quiet step (norms, the policy on the device, the clip multiply, the row kept);
- ``gradwatch read step``: the same plus the host copy and the record (every 10th step);
- the unwatched training step (forward, backward, Adam), for the ratios.

Ratio = (unwatched step + the arm's work) / unwatched step. Then whole steps, interleaved
(unwatched, clip_grad_norm_, gradwatch defaults, zclip), minimum per arm over rounds.

One intra-op thread (``--threads``), as the floor in FACTS.md was measured: on two cores
shared with other jobs, a two-thread row reduction waits for a descheduled peer thread
and its time says more about the machine's load than about the code.

``python -m benchmarks.many_tensors [--quick] [--threads N] [--json PATH]``.
"""

from __future__ import annotations

import sys

for _name in ("tensorflow", "keras"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.harness import emit, rotated


class Many(nn.Module):
    """``n`` ``nn.Linear(d, d)`` side by side, summed: 2n small parameter tensors."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x) for layer in self.layers]).sum(0)


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    import gradwatch

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, repeats, step_repeats, rounds = (50, 3, 3, 2) if a.quick else (1000, 100, 10, 24)
    torch.manual_seed(0)
    base = Many(n, 32)
    x, y = torch.randn(16, 32), torch.randn(16, 32)

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = copy.deepcopy(base)
        return m, torch.optim.Adam(m.parameters(), lr=1e-3)

    def with_grads() -> nn.Module:
        m = copy.deepcopy(base)
        nn.functional.mse_loss(m(x), y).backward()
        return m

    model, opt = make()
    nn.functional.mse_loss(model(x), y).backward()
    params = list(model.parameters())
    grads = [q.grad for q in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    fns: dict[str, Callable[[], object]] = {
        "floor: one norm over one flat buffer": lambda: torch.linalg.vector_norm(flat),
        "get_total_norm (foreach)": lambda: torch.nn.utils.get_total_norm(grads),
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
    }
    watches = []
    for label, policy in (("gradwatch quiet step", None), ("gradwatch quiet step, zclip", "zclip")):
        w = gradwatch.watch(with_grads(), None, policy=policy, sinks=[])
        att = w.attachment
        att._quiet = lambda: True  # time the quiet path alone
        fns[label] = lambda att=att: (att._measure(read=False), att._pending.clear())
        watches.append(w)
    w = gradwatch.watch(with_grads(), None, sinks=[])
    fns["gradwatch read step"] = w.step
    watches.append(w)
    work = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for r in range(repeats):
        for k in rotated(list(fns), r):
            t0 = time.perf_counter()
            fns[k]()
            work[k] = min(work[k], time.perf_counter() - t0)
    for w in watches:
        w.close()

    def unwatched_step() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    step = best(unwatched_step, step_repeats)
    # Whole steps, interleaved: the minimum per arm over rounds.
    arms: dict[str, Callable[[], None]] = {}
    for arm in ("unwatched", "clip_grad_norm_", "gradwatch defaults", "gradwatch zclip"):
        m, o = make()
        if arm.startswith("gradwatch"):
            gradwatch.watch(m, o, sinks=[], policy="zclip" if arm.endswith("zclip") else None)

        def run(m: nn.Module = m, o: torch.optim.Optimizer = o, clip: bool = arm == "clip_grad_norm_") -> None:
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()

        run()
        arms[arm] = run
    whole: dict[str, float] = {k: float("inf") for k in arms}
    for r in range(rounds):
        for arm in rotated(list(arms), r):
            t0 = time.perf_counter()
            arms[arm]()
            whole[arm] = min(whole[arm], time.perf_counter() - t0)
    print(f"{2 * n} tensors, {torch.get_num_threads()} thread(s); unwatched step {step * 1e3:.1f} ms (min of {step_repeats}); work: min of {repeats}")
    print("| work per step | ms | x floor | (step + work) / step |")
    print("| --- | ---: | ---: | ---: |")
    floor = work["floor: one norm over one flat buffer"]
    for k, v in work.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / floor:.1f} | {(step + v) / step:.3f} |")
    print()
    print(f"| whole step, interleaved ({rounds} rounds, min) | ms | ratio |")
    print("| --- | ---: | ---: |")
    for k, v in whole.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / whole['unwatched']:.3f} |")
    if a.json:
        emit(a.json, {"bench": "many_tensors", "tensors": 2 * n, "step_s": step, "work_s": work, "whole_s": whole})


if __name__ == "__main__":
    main()
