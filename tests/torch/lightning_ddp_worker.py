"""Lightning DDP (2 CPU processes, gloo) with gradwatch's callback; run by test_lightning.py.

    python lightning_ddp_worker.py OUT_DIR

Lightning's DDP launcher starts rank 1 by running this script again. Each rank writes
``OUT_DIR/rank<r>.json``: its records (step, global norm) and the global norm it read
itself from ``p.grad`` in ``on_before_optimizer_step``; the callback's run file is
``OUT_DIR/run.jsonl`` (rank 0 only).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn

from gradwatch_torch.lightning import GradWatchCallback


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.gru(x)
        return nn.functional.mse_loss(self.head(out[:, -1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Truth(L.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in pl_module.parameters())))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=(1, 2)).unsqueeze(1))
    truth = Truth()
    cb = GradWatchCallback(profile_every=2, log_every=2, sinks=[f"jsonl:{out / 'run.jsonl'}"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[truth, cb],
    )
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=4))  # 8 batches per rank... 4 after the split
    records = [(r.step, r.global_norm) for r in cb.records]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"records": records, "truth": truth.norms}))
    cb.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
