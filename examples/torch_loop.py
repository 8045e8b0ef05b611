"""Watch an ordinary PyTorch training loop with gradwatch.

A small LSTM learns to recall the first token of a sequence at its end: the gradient must
travel back through every timestep, which is exactly what gradwatch's per-timestep
profile shows. The loop is a plain loop; gradwatch hooks into ``optimizer.step()``.

    python examples/torch_loop.py --steps 200 --out runs/torch_loop

writes ``runs/torch_loop/run.jsonl`` (read it with ``gradwatch report``) and prints a
summary: the global gradient norm, the clipping decisions and, for the LSTM, how far back
in time its gradient reaches (the horizon) and its forget-gate statistics.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

import gradwatch


class Recall(nn.Module):
    """Embed tokens, run an LSTM, predict the first token from the last hidden state."""

    def __init__(self, vocab: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=30)
    parser.add_argument("--policy", default="zclip", help='None, "fixed", "autoclip", "zclip" or "agc"')
    parser.add_argument("--out", type=Path, default=Path("runs/torch_loop"))
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    vocab = 8
    model = Recall(vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    args.out.mkdir(parents=True, exist_ok=True)
    policy = None if args.policy in ("None", "none", "") else args.policy

    with gradwatch.watch(
        model,
        optimizer,
        policy=policy,
        profile_every=10,
        log_every=max(1, args.steps // 4),
        sinks=["logging", f"jsonl:{args.out / 'run.jsonl'}"],
    ) as watch:
        for step in range(args.steps):
            tokens = torch.randint(0, vocab, (32, args.seq_len))
            loss = nn.functional.cross_entropy(model(tokens), tokens[:, 0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # gradwatch measures (and clips, with a policy) in here

        records = watch.records
        last = records[-1]
        profiled = [r for r in records if r.temporal]
        print(f"steps: {last.step}   final loss: {loss.item():.3f}   global norm: {last.global_norm:.4g}")
        clipped = sum(1 for r in records if r.clip is not None and r.clip.scale < 1.0)
        print(f"policy: {policy}   steps clipped: {clipped}")
        if profiled:
            prof = profiled[-1].temporal["lstm"]
            print(
                f"lstm at step {profiled[-1].step}: gain per step back {prof.gain:.3f}, "
                f"horizon {prof.horizon} of {len(prof.norms)} timesteps, "
                f"earliest/peak {prof.earliest_over_peak:.2e}"
            )
            gates = profiled[-1].gates.get("lstm")
            if gates is not None:
                print(f"lstm forget gate: mean {gates.mean:.3f}, log path gain {gates.log_path_gain:.2f}")
            for name, sigma in profiled[-1].spectral.items():
                print(f"  sigma_max {name} = {sigma:.3f}")
        print(f"events: {len(watch.events)}   run file: {args.out / 'run.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
