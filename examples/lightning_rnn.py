"""Watch a Lightning training run with gradwatch: add one callback.

A small LSTM learns to recall the first token of a sequence at its end (synthetic data,
built here: nothing is downloaded). The gradient must travel back through every
timestep, which gradwatch's per-timestep profile of the LSTM shows. The only gradwatch
line in the training code is the callback in ``Trainer(callbacks=[...])``:

    python examples/lightning_rnn.py --steps 200 --out runs/lightning_rnn

With ``--clip-val 1.0`` Lightning's own ``gradient_clip_val`` clips too: gradwatch
measures before it (the records and ``gradwatch/grad_norm`` are pre-clip norms), its
policy clips first and Lightning's clipping caps what is left (a warning says so once). Every Lightning logger gets the ``gradwatch/...``
keys; here a ``CSVLogger`` writes them to ``runs/lightning_rnn/metrics.csv``, and the
callback's run file is ``runs/lightning_rnn/run.jsonl`` (``gradwatch report`` reads it).
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from gradwatch_torch.lightning import GradWatchCallback


class Recall(L.LightningModule):
    """Embed tokens, run an LSTM, predict the first token from the last hidden state."""

    def __init__(self, vocab: int = 8, hidden: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        out, _ = self.lstm(self.embed(tokens))
        loss = nn.functional.cross_entropy(self.head(out[:, -1]), tokens[:, 0])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=30)
    parser.add_argument("--policy", default="zclip", help='None, "fixed", "autoclip", "zclip" or "agc"')
    parser.add_argument("--clip-val", type=float, default=0.0, help="Lightning's own gradient_clip_val (0: off)")
    parser.add_argument("--accumulate", type=int, default=1, help="Lightning's accumulate_grad_batches")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_rnn"))
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    L.seed_everything(0, verbose=False)
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = 8
    batches = args.steps * args.accumulate
    tokens = torch.randint(0, vocab, (32 * batches, args.seq_len), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=32)
    policy = None if args.policy in ("None", "none", "") else args.policy

    callback = GradWatchCallback(
        policy=policy,
        profile_every=10,
        log_every=max(1, args.steps // 4),
        sinks=["logging", f"jsonl:{args.out / 'run.jsonl'}"],
    )
    logger = CSVLogger(args.out, name="", version="")
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=args.clip_val or None,
        accumulate_grad_batches=args.accumulate,
        logger=logger,
        log_every_n_steps=max(1, args.steps // 10),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recall(vocab), loader)

    records = callback.records
    last = records[-1]
    clipped = sum(1 for r in records if r.clip is not None and r.clip.clipped)
    print(
        f"steps: {last.step}   global norm (pre-clip): {last.global_norm:.4g}   policy: {policy}   steps clipped: {clipped}"
    )
    profiled = [r for r in records if "lstm" in r.temporal]
    profiled = [r for r in profiled if r.temporal["lstm"].propagation] or profiled  # the latest with propagation
    if profiled:
        prof = profiled[-1].temporal["lstm"]
        through_time = (
            f"gain per step back {prof.gain:.3f}, horizon {prof.horizon}"
            if prof.propagation
            else "no propagation measured"
        )
        print(
            f"lstm at step {profiled[-1].step}: {len(prof.norms)} timesteps profiled, earliest/peak {prof.earliest_over_peak:.2e}, {through_time}"
        )
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = sorted({k for row in rows for k, v in row.items() if k.startswith("gradwatch/") and v})
    print(f"logger keys: {', '.join(keys)}")
    print(
        f"events: {len(callback.events)}   run file: {args.out / 'run.jsonl'}   metrics: {Path(logger.log_dir) / 'metrics.csv'}"
    )
    callback.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
