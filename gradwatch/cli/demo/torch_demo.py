"""The PyTorch half of ``gradwatch demo``: seven small recurrent models under gradwatch
(the six classic ones and a minGRU, :mod:`gradwatch.cli.demo._mingru`).

Every number the demo prints comes from training these models here and now (seeded, so
two runs of the demo agree). Settings were chosen so that each model gets its fair chance
within the two-minute budget on two CPU cores: hidden sizes, learning rates, optimizers
and sequence lengths differ between runs, and the table in the report says which each
one used.

The clipping pair trains with SGD and momentum on 30-step sequences, the setting where
clipping decides the outcome (Pascanu et al. 2013): with Adam, whose steps are normalised
per parameter, clipping barely changes anything, and on 100 steps this ReLU RNN does not
learn the task in the demo's budget with or without clipping (measured).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gradwatch.cli.demo._progress import Progress
from gradwatch.cli.demo.tasks import FirstSignTask

__all__ = ["RUNS", "RunResult", "RunSpec", "train_all"]


@dataclass(frozen=True)
class RunSpec:
    """One demo run: which recurrent cell, how it is initialised and trained."""

    name: str  # file stem and run name: DIR/<name>.jsonl
    cell: str  # "tanh" | "lstm" | "gru" | "relu" | "mingru"
    hidden: int
    lr: float
    policy: str | None
    description: str
    length: int = 100  # timesteps of the task's sequences
    optimizer: str = "adam"  # "adam" | "sgd" (with momentum 0.9)

    def run_file(self, out: Path) -> Path:
        """Where this run's JSONL goes: ``out/<name>.jsonl``."""
        return out / f"{self.name}.jsonl"

    def watch_options(self, out: Path, steps: int) -> dict[str, Any]:
        """The gradwatch options of this run, the same for PyTorch and Keras: a run file
        in ``out``, and profiles and flushes often enough for about 20+ points even on a
        short run; a policy (if any) caps at max_norm=1."""
        every = max(1, min(5, steps // 20))
        options: dict[str, Any] = {
            # "logging": the alerts a user's log shows (the demo prints them under each run)
            "sinks": ["logging", f"jsonl:{self.run_file(out)}"],
            "profile_every": every,
            # the story is told from propagation measured at every profiled step (the demo's
            # small layers replay in a few milliseconds; the default budget would space them out)
            "replay_every": 1,
            "log_every": every,
            "run_name": self.name,
            "policy": self.policy,
        }
        if self.policy is not None:
            options["max_norm"] = 1.0
        return options

    @property
    def task(self) -> FirstSignTask:
        return FirstSignTask(length=self.length)


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    path: Path
    accuracy: float  # on 512 held-out sequences after training
    final_loss: float  # mean training loss over the last 10% of steps
    seconds: float


RUNS: tuple[RunSpec, ...] = (
    RunSpec("rnn_tanh", "tanh", 64, 1e-3, None, "vanilla tanh nn.RNN, default init, Adam"),
    RunSpec("lstm", "lstm", 64, 1e-3, None, "nn.LSTM, forget-gate bias 1 (in b_ih and b_hh), Adam"),
    RunSpec("gru", "gru", 32, 3e-3, None, "nn.GRU, update-gate bias 2 (in b_ih and b_hh), Adam"),
    RunSpec(
        "mingru", "mingru", 64, 1e-3, None, "minGRU written in the demo (a diagonal recurrence), default init, Adam"
    ),
    RunSpec("relu_rnn", "relu", 64, 3e-3, None, "ReLU nn.RNN, W_hh = 1.1*I, Adam, no clipping"),
    RunSpec("relu_sgd", "relu", 64, 1e-2, None, "ReLU nn.RNN, W_hh = 1.1*I, 30 steps, SGD momentum 0.9, no clipping", 30, "sgd"),
    RunSpec("relu_sgd_fixed", "relu", 64, 1e-2, "fixed", "the same, same seed, policy='fixed' (max_norm=1)", 30, "sgd"),
)

BATCH = 32
EVAL_SIZE = 512


def _build(spec: RunSpec) -> Any:  # a torch.nn.Module
    import torch
    from torch import nn

    def param(module: nn.Module, name: str) -> torch.Tensor:
        return getattr(module, name)  # type: ignore[no-any-return]

    h = spec.hidden
    if spec.cell == "lstm":
        rnn: nn.Module = nn.LSTM(1, h, batch_first=True)
        with torch.no_grad():  # PyTorch gate order i, f, g, o: the forget gate is rows h:2h
            param(rnn, "bias_ih_l0")[h : 2 * h].fill_(1.0)
            param(rnn, "bias_hh_l0")[h : 2 * h].fill_(1.0)
    elif spec.cell == "gru":
        rnn = nn.GRU(1, h, batch_first=True)
        with torch.no_grad():  # gate order r, z, n; h' = (1 - z) n + z h, so z near 1 keeps memory
            param(rnn, "bias_ih_l0")[h : 2 * h].fill_(2.0)
            param(rnn, "bias_hh_l0")[h : 2 * h].fill_(2.0)
    elif spec.cell == "mingru":
        from gradwatch.cli.demo._mingru import MinGRU

        rnn = MinGRU(1, h)  # declared to gradwatch in train_one (register_recurrence)
    elif spec.cell == "relu":
        rnn = nn.RNN(1, h, nonlinearity="relu", batch_first=True)
        with torch.no_grad():  # identity-like recurrence, 10% too strong: explodes through time
            param(rnn, "weight_hh_l0").copy_(1.1 * torch.eye(h))
            param(rnn, "bias_hh_l0").zero_()
            param(rnn, "bias_ih_l0").zero_()
    else:
        rnn = nn.RNN(1, h, nonlinearity="tanh", batch_first=True)

    class SeqClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn
            self.head = nn.Linear(h, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1]).squeeze(-1)  # the loss sees only the last step

    return SeqClassifier()


def train_one(spec: RunSpec, out: Path, steps: int, seed: int = 0, stream: TextIO | None = None) -> RunResult:
    import torch

    import gradwatch

    task = spec.task
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = _build(spec)
    if spec.optimizer == "sgd":
        optimizer: Any = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    path = spec.run_file(out)
    options = spec.watch_options(out, steps)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    losses: list[float] = []
    bar = Progress(spec.name, steps, stream)
    declared = None
    if spec.cell == "mingru":  # what a user does for a recurrence gradwatch does not know
        from gradwatch.cli.demo._mingru import declare

        declared = declare()
    start = time.perf_counter()
    try:
        watch = gradwatch.watch(model, optimizer, **options)
    finally:
        if declared is not None:  # the watch holds its probe now: leave no declaration behind
            from gradwatch_torch.recurrences import unregister_recurrence

            unregister_recurrence(declared)
    with watch:
        watch.monitor.meta["demo"] = {
            "description": spec.description,
            "hidden": spec.hidden,
            "lr": spec.lr,
            "length": spec.length,
            "optimizer": spec.optimizer,
        }
        for step in range(1, steps + 1):
            x, y = task.batch(rng, BATCH)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            optimizer.step()  # gradwatch measures (and with a policy, clips) in here
            losses.append(float(loss.detach()))
            recent = [v for v in losses[-50:] if math.isfinite(v)]
            norm = watch.monitor.records[-1].global_norm if step % 10 == 0 or step == steps else None
            bar.update(
                step,
                f"loss {np.mean(recent) if recent else math.nan:.3f}"
                + (f"  |g| {norm:.2e}" if norm is not None else ""),
            )
    seconds = time.perf_counter() - start
    eval_rng = np.random.default_rng(10_000 + seed)
    x, y = task.batch(eval_rng, EVAL_SIZE)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    accuracy = float(np.mean((logits > 0) == (y > 0.5)))  # NaN logits predict 0: counted honestly
    tail = losses[-max(1, steps // 10) :]
    final_loss = float(np.mean(tail))
    bar.close(f"accuracy {accuracy:.2f}")
    return RunResult(spec, path, accuracy, final_loss, seconds)


def _train_echoing(train: Any, spec: RunSpec, out: Path, steps: int, seed: int, stream: TextIO | None) -> RunResult:
    """Train one run and print, under its progress bar, the alert lines its log showed."""
    import sys

    from gradwatch.cli.demo._alerts import echo_alerts

    with echo_alerts() as echo:
        result = train(spec, out, steps, seed, stream)
    echo.print(stream if stream is not None else sys.stderr, spec.name)
    return result  # type: ignore[no-any-return]


def train_all(out: Path, steps: int, seed: int = 0, stream: TextIO | None = None) -> list[RunResult]:
    """Train every run of :data:`RUNS`, one JSONL file each in ``out``."""
    import torch

    threads = torch.get_num_threads()
    # Small recurrent models are latency-bound: extra threads only contend (measured here:
    # 2 threads made a 64-unit RNN step 14x slower than 1 thread on 2 cores).
    torch.set_num_threads(1)
    try:
        return [_train_echoing(train_one, spec, out, steps, seed, stream) for spec in RUNS]
    finally:
        torch.set_num_threads(threads)
