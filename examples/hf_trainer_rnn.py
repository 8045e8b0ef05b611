"""Watch a Hugging Face ``Trainer`` run with gradwatch: add one callback.

A small GRU learns to recall the first token of a sequence at its end (synthetic data and
a model built here: nothing is downloaded from the Hub). The Trainer accepts any
``nn.Module`` whose forward returns a dict with ``"loss"``; a ``PreTrainedModel`` works
the same way. The only gradwatch line is the callback in ``Trainer(callbacks=[...])``:

    python examples/hf_trainer_rnn.py --steps 200 --out runs/hf_trainer_rnn

What it shows: every record's global norm equals the ``grad_norm`` the Trainer itself
logs (both are taken before ``max_grad_norm`` clips), the ``gradwatch/...`` keys are merged
into the Trainer's logs (so every ``report_to`` tracker and ``trainer.state.log_history``
get them), and, with a policy, how it combines with ``max_grad_norm`` (the warning
printed once at train begin; ``--max-grad-norm 0`` lets the policy alone decide). The
callback's run file is ``runs/hf_trainer_rnn/run.jsonl`` (``gradwatch report`` reads it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from gradwatch_torch.transformers import GradWatchCallback


class Recall(nn.Module):
    """Embed tokens, run a GRU, predict the first token from the last hidden state."""

    def __init__(self, vocab: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out, _ = self.gru(self.embed(input_ids))
        logits = self.head(out[:, -1])
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = nn.functional.cross_entropy(logits, labels)
        return result


class RecallData(torch.utils.data.Dataset):
    """Random token sequences; the label is the first token."""

    def __init__(self, n: int, seq_len: int, vocab: int = 8) -> None:
        self.tokens = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i, 0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=30)
    parser.add_argument("--policy", default="zclip", help='None, "fixed", "autoclip", "zclip" or "agc"')
    parser.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="the Trainer's own clipping (its default: 1.0)"
    )
    parser.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer_rnn"))
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    policy = None if args.policy in ("None", "none", "") else args.policy

    callback = GradWatchCallback(
        policy=policy,
        profile_every=10,
        log_every=max(1, args.steps // 4),
        sinks=["logging", f"jsonl:{args.out / 'run.jsonl'}"],
    )
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=args.accumulate,
        learning_rate=3e-3,
        max_grad_norm=args.max_grad_norm,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",  # or "tensorboard", "wandb", ...: they receive the gradwatch/... keys too
        use_cpu=True,
        disable_tqdm=True,
    )
    data = RecallData(32 * args.steps * args.accumulate, args.seq_len)
    trainer = Trainer(model=Recall(), args=training_args, train_dataset=data, callbacks=[callback])
    trainer.train()

    records = {r.step: r for r in callback.records}
    logs = [e for e in trainer.state.log_history if "grad_norm" in e]
    agree = all(math.isclose(e["grad_norm"], records[e["step"]].global_norm, rel_tol=1e-6) for e in logs)
    last = logs[-1]
    print(
        f"steps: {trainer.state.global_step}   Trainer grad_norm == gradwatch global norm at every logged step: {agree}"
    )
    print(
        "last log: "
        + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("gradwatch/") or k == "grad_norm")
    )
    clipped = sum(1 for r in records.values() if r.clip is not None and r.clip.clipped)
    print(f"policy: {policy}   steps clipped by it: {clipped}   max_grad_norm: {trainer.args.max_grad_norm}")
    profiled = [r for r in records.values() if "gru" in r.temporal]
    profiled = [r for r in profiled if r.temporal["gru"].propagation] or profiled  # the latest with propagation
    if profiled:
        prof = profiled[-1].temporal["gru"]
        through_time = (
            f"gain per step back {prof.gain:.3f}, horizon {prof.horizon}"
            if prof.propagation
            else "no propagation measured"
        )
        print(
            f"gru at step {profiled[-1].step}: {len(prof.norms)} timesteps profiled, earliest/peak {prof.earliest_over_peak:.2e}, {through_time}"
        )
    print(f"events: {len(callback.events)}   run file: {args.out / 'run.jsonl'}")
    callback.close()
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
