"""PyTorch overhead: gradwatch against an unwatched loop and the tools people use today.

W1: 2-layer nn.LSTM (input 64, hidden 256), sequences of 100, batch 32, linear head on
    the last step (10 classes), Adam.
W2: embedding 20,000 x 256, 1-layer LSTM 256, head to the 20,000-word vocabulary, loss
    on every step, sequences of 64, batch 16, Adam.

Every arm owns its own copy of the same initial model and its own Adam; all arms see the
same batches. ``python -m benchmarks.torch_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import sys

# TensorBoard's writer imports TensorFlow when it can; a PyTorch user without it gets
# TensorBoard's own stub. Keep it out so this process holds torch only, as users' do.
for _name in ("tensorflow", "keras"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import argparse
import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.harness import (
    Arm,
    Workload,
    emit,
    have,
    logger,
    missing,
    run_interleaved,
    summarize,
)

log = logger("torch")

TARGETS = {"gradwatch defaults": 1.02, "gradwatch zclip": 1.03, "gradwatch profile_every=1": 1.10}


class LastStepLSTM(nn.Module):
    def __init__(self, inp: int, hidden: int, layers: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inp, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def workload(name: str, quick: bool) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], Callable, str]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    nb = 4  # distinct batches, cycled
    if name == "W1":
        inp, hidden, seq, batch, classes = (8, 16, 12, 4, 3) if quick else (64, 256, 100, 32, 10)
        model = LastStepLSTM(inp, hidden, 2, classes)
        data = [
            (torch.randn(batch, seq, inp, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(nb)
        ]
        loss_fn = nn.CrossEntropyLoss()

        def loss_of(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(m(x), y)

        desc = (
            f"2-layer nn.LSTM (input {inp}, hidden {hidden}), sequences of {seq}, batch {batch}, "
            f"linear head on the last step ({classes} classes), Adam."
        )
    else:
        vocab, dim, seq, batch = (50, 16, 10, 4) if quick else (20_000, 256, 64, 16)
        model = LanguageModel(vocab, dim)
        data = []
        for _ in range(nb):
            t = torch.randint(0, vocab, (batch, seq + 1), generator=g)
            data.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        loss_fn = nn.CrossEntropyLoss()

        def loss_of(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = m(x)
            return loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        desc = (
            f"embedding {vocab:,} x {dim}, 1-layer LSTM {dim}, head to the {vocab:,}-word vocabulary, "
            f"loss on every step, sequences of {seq}, batch {batch}, Adam."
        )
    return model, data, loss_of, desc


def make_arm(
    name: str,
    base: nn.Module,
    data: list,
    loss_of: Callable,
    *,
    before_step: Callable[[nn.Module], None] | None = None,
    attach: Callable[[nn.Module, torch.optim.Optimizer], Any] | None = None,
    close: Callable[[], None] | None = None,
    setup: Callable[[nn.Module], Callable[[nn.Module], None]] | None = None,
    note: str = "",
) -> Arm:
    """An arm: its own model copy and Adam; ``before_step`` runs between backward and step
    (explicit tools), ``attach`` hooks into the optimizer (gradwatch)."""
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if setup is not None:
        before_step = setup(model)
    handle = attach(model, opt) if attach is not None else None
    state = {"i": 0}
    perf = time.perf_counter

    def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            x, y = data[state["i"] % len(data)]
            state["i"] += 1
            t0 = perf()
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, x, y)
            loss.backward()
            if before_step is not None:
                before_step(model)
            opt.step()
            out.append(perf() - t0)
        return out

    def _close() -> None:
        if handle is not None:
            handle.close()
        if close is not None:
            close()

    return Arm(name, run, _close, TARGETS.get(name), note)


def floor_arm(base: nn.Module, data: list, loss_of: Callable) -> Arm:
    """Unwatched plus one ``torch._foreach_norm`` over all gradients and one host copy:
    the least any per-parameter gradient monitor can do. Its time is also measured alone."""
    inner: list[float] = []
    perf = time.perf_counter

    def before(model: nn.Module) -> None:
        t0 = perf()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch.stack(torch._foreach_norm(grads)).cpu()
        inner.append(perf() - t0)

    arm = make_arm("floor: one _foreach_norm", base, data, loss_of, before_step=before,
                   note="+ stack + host copy")
    arm.extra["foreach_norm"] = inner
    return arm


def _replay_every_profiled_step(w: Any) -> Any:
    """Lift this watch's replay budget (its own probes only: the other arms share the
    process), so the arm's excess over "profile_every=1" is the replay's own cost."""
    from gradwatch_torch._recurrent import outside_backward

    for probe in getattr(w.attachment, "_probes", []):
        probe._replay_due = lambda flops, tokens, p=probe: p.on("replay") and p._replays == 0 and outside_backward()
    return w


def build_arms(base: nn.Module, data: list, loss_of: Callable, quick: bool, diagnostic: bool = True
               ) -> tuple[list[Arm], list]:
    import gradwatch

    arms: list[Arm] = []
    absent: list = []
    arms.append(make_arm("unwatched", base, data, loss_of))
    arms.append(make_arm(
        "clip_grad_norm_", base, data, loss_of,
        before_step=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0), note="max_norm=1.0",
    ))
    arms.append(floor_arm(base, data, loss_of))
    arms.append(make_arm(
        "gradwatch defaults", base, data, loss_of, attach=lambda m, o: gradwatch.watch(m, o),
        note="all defaults: sinks=['logging'], profile_every=10, log_every=50",
    ))
    if diagnostic:
        arms.append(make_arm(
            "gradwatch profile_every=0", base, data, loss_of,
            attach=lambda m, o: gradwatch.watch(m, o, profile_every=0), note="diagnostic: norms only",
        ))
    arms.append(make_arm(
        "gradwatch zclip", base, data, loss_of, attach=lambda m, o: gradwatch.watch(m, o, policy="zclip"),
        note='policy="zclip", otherwise defaults',
    ))
    arms.append(make_arm(
        "gradwatch profile_every=1", base, data, loss_of,
        attach=lambda m, o: gradwatch.watch(m, o, profile_every=1), note="otherwise defaults",
    ))

    if diagnostic:
        arms.append(make_arm(
            "gradwatch profile_every=1, replay every step", base, data, loss_of,
            attach=lambda m, o: _replay_every_profiled_step(gradwatch.watch(m, o, profile_every=1)),
            note="diagnostic: the through-time replay on every profiled step, not every n-th",
        ))
        arms.append(make_arm(
            "gradwatch defaults, replay every profiled step", base, data, loss_of,
            attach=lambda m, o: gradwatch.watch(m, o, replay_every=1),
            note="diagnostic: profile_every=10 with propagation measured on every profiled step (replay_every=1)",
        ))

    # -- the tools people use today -------------------------------------------------------
    if have("tensorboard"):
        from torch.utils.tensorboard import SummaryWriter

        logdir = tempfile.mkdtemp(prefix="gradwatch-bench-tb-")
        writer = SummaryWriter(logdir)
        step = {"n": 0}

        def hist(m: nn.Module) -> None:
            step["n"] += 1
            for name, p in m.named_parameters():
                if p.grad is not None:
                    writer.add_histogram(name, p.grad, step["n"])

        def close_tb() -> None:
            writer.close()
            shutil.rmtree(logdir, ignore_errors=True)

        arms.append(make_arm(
            "tensorboard add_histogram", base, data, loss_of, before_step=hist, close=close_tb,
            note="torch.utils.tensorboard, one histogram per parameter per step (local files)",
        ))
    else:
        absent.append(missing("tensorboard add_histogram"))

    if have("lightning") or have("pytorch-lightning"):
        try:
            from lightning.pytorch.utilities import grad_norm
        except ImportError:
            from pytorch_lightning.utilities import grad_norm
        arms.append(make_arm(
            "Lightning grad_norm", base, data, loss_of, before_step=lambda m: grad_norm(m, 2),
            note="lightning.pytorch.utilities.grad_norm(model, 2) each step (no logger)",
        ))
    else:
        absent.append(missing("Lightning grad_norm"))

    if have("autoclip"):
        from autoclip.torch import QuantileClip

        def setup_autoclip(m: nn.Module) -> Callable[[nn.Module], None]:
            clipper = QuantileClip(m.parameters(), quantile=0.9, history_length=1000)
            return lambda _m: clipper.step()

        arms.append(make_arm(
            "autoclip package", base, data, loss_of, setup=setup_autoclip,
            note="autoclip.torch.QuantileClip(quantile=0.9, history_length=1000), per parameter",
        ))
    else:
        absent.append(missing("autoclip package"))

    if have("zclip"):
        from zclip import ZClip

        def setup_zclip(m: nn.Module) -> Callable[[nn.Module], None]:
            z = ZClip(mode="zscore", alpha=0.97, z_thresh=2.5, clip_option="adaptive_scaling",
                      max_grad_norm=1.0, clip_factor=1.0)
            return lambda mm: z.step(mm)

        arms.append(make_arm(
            "zclip package", base, data, loss_of, setup=setup_zclip,
            note="zclip.ZClip(mode='zscore', max_grad_norm=1.0).step(model)",
        ))
    else:
        absent.append(missing("zclip package"))
    return arms, absent


PLAN = {  # rounds, steps per round, warm-up steps
    "W1": (10, 10, 10),
    "W2": (8, 10, 10),
}


def bench(name: str, quick: bool, rounds: int | None = None) -> Workload:
    base, data, loss_of, desc = workload(name, quick)
    r, s, w = (2, 10, 2) if quick else PLAN[name]
    if rounds:
        r = rounds
    arms, absent = build_arms(base, data, loss_of, quick, diagnostic=(name == "W1"))
    log(f"{name}: {len(arms)} arms, {r} rounds x {s} steps, warm-up {w}")
    try:
        times, extras = run_interleaved(arms, rounds=r, steps=s, warmup=w, log=log)
    finally:
        for a in arms:
            a.close()
    results = [summarize(a, times) for a in arms] + absent
    for res in results:
        log(f"{name} {res.name:32s} median {res.median if res.median is None else round(res.median, 3)} "
            f"[{res.min and round(res.min, 3)}, {res.max and round(res.max, 3)}]")
    extra: dict[str, Any] = {}
    floor = extras.get("floor: one _foreach_norm", {}).get("foreach_norm")
    if floor:
        import statistics

        shares = [f / u for f, u in zip(floor, times["unwatched"])]
        extra["floor"] = (
            f"one `torch._foreach_norm` over all {sum(1 for _ in base.parameters())} gradients "
            f"(+ stack + host copy), timed alone: median {100 * statistics.median(shares):.2f}% "
            f"of an unwatched step (min {100 * min(shares):.2f}%, max {100 * max(shares):.2f}%)"
        )
    return Workload(name, desc, r, s, w, results, extra)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--workloads", default="W1,W2")
    p.add_argument("--rounds", type=int)
    a = p.parse_args(argv)
    import gradwatch  # noqa: F401  (import cost outside the timed region)

    # Threads: torch's default (one per core, 2 here), stated in the results.
    t0 = time.perf_counter()
    workloads = [bench(w, a.quick, a.rounds) for w in a.workloads.split(",")]
    emit(a.json, {
        "bench": "torch",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
        "workloads": workloads,
    })


if __name__ == "__main__":
    main()
