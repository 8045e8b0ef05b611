"""gradwatch_torch.transformers.GradWatchCallback inside the real Hugging Face Trainer.

Tiny models built from code (no hub downloads). Ground truth: the Trainer's own
``log_history`` (its pre-clip ``grad_norm``), ``p.grad`` read by callbacks written here,
and runs without gradwatch (the Trainer's own clipping).
"""

from __future__ import annotations

import logging
import math
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")
transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers")

from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradwatch
from gradwatch_torch.transformers import STATE_KEY, GradWatchCallback

VOCAB, T = 6, 10


class Recall(nn.Module):
    """Embedding, GRU, linear head; returns the loss the Trainer reads from "loss"."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(12, VOCAB)
        self.calls, self.nan_at = 0, nan_at

    def forward(self, input_ids, labels=None):
        self.calls += 1
        out, _ = self.gru(self.embed(input_ids))
        logits = self.head(out[:, -1])
        loss = nn.functional.cross_entropy(logits.float(), labels) * 10.0
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "logits": logits}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        self.x = torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i, 0]}


def make_args(tmp_path, **kw) -> TrainingArguments:
    opts = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "learning_rate": 1e-2,
        "seed": 0,
        "max_grad_norm": 0.0,
    }
    opts.update(kw)
    return TrainingArguments(**opts)


def train(tmp_path, callbacks, model=None, resume=None, **kw):
    torch.manual_seed(0)
    model = model if model is not None else Recall()
    trainer = Trainer(model=model, args=make_args(tmp_path, **kw), train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def norm(model: nn.Module) -> float:
    return math.sqrt(
        sum(float(np.sum(p.grad.detach().double().numpy() ** 2)) for p in model.parameters() if p.grad is not None)
    )


class Applied(TrainerCallback):
    """The gradient the optimizer applied: read after optimizer.step(), before zero_grad."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(norm(model))


def logged(trainer, key="grad_norm"):
    return [e[key] for e in trainer.state.log_history if key in e and "loss" in e]


def test_records_equal_the_trainers_logged_grad_norm_every_step(tmp_path):
    applied, cb = Applied(), GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer = train(tmp_path, [cb, applied], max_grad_norm=0.05)
    assert len(logged(trainer)) == len(cb.records) == 6
    assert [r.global_norm for r in cb.records] == pytest.approx(logged(trainer), rel=1e-6)
    assert min(logged(trainer)) > 0.1 and max(applied.norms) <= 0.05 * (1 + 1e-5)  # max_grad_norm still clipped


def test_without_policy_training_is_bitwise_as_unwatched(tmp_path):
    watched = train(tmp_path / "a", [GradWatchCallback(sinks=["memory"], profile_every=1)], max_grad_norm=0.05)
    plain = train(tmp_path / "b", [], max_grad_norm=0.05)
    assert logged(watched) == logged(plain)
    for (name, a), b in zip(watched.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_policy_clip_is_what_the_optimizer_applies(tmp_path):
    applied, cb = Applied(), GradWatchCallback(policy="fixed", max_norm=0.2, sinks=["memory"], profile_every=0)
    watched = train(tmp_path / "a", [cb, applied], max_grad_norm=0.0)
    clipped_by_trainer = train(tmp_path / "b", [], max_grad_norm=0.2)  # torch's clip_grad_norm_, not gradwatch
    assert min(r.global_norm for r in cb.records) > 0.2
    assert applied.norms == pytest.approx([0.2] * 6, rel=1e-5)
    for (name, a), b in zip(watched.model.state_dict().items(), clipped_by_trainer.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_policy_and_max_grad_norm_the_tighter_wins_and_a_warning_says_so_once(tmp_path, caplog):
    applied, cb = Applied(), GradWatchCallback(policy="fixed", max_norm=0.5, sinks=["memory"], profile_every=0)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer = train(tmp_path, [cb, applied], max_grad_norm=0.1)
    assert applied.norms == pytest.approx([0.1] * 6, rel=1e-5)
    assert [r.global_norm for r in cb.records] == pytest.approx(logged(trainer), rel=1e-6)  # still pre-clip
    assert all(r.clip.threshold == pytest.approx(0.5) for r in cb.records)
    warnings = [r.getMessage() for r in caplog.records if "max_grad_norm=0.1" in r.getMessage()]
    assert len(warnings) == 1 and "tighter" in warnings[0] and "max_grad_norm=0" in warnings[0]


def test_one_record_per_optimizer_step_with_accumulation(tmp_path):
    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer = train(tmp_path, [cb], gradient_accumulation_steps=3, max_steps=3, max_grad_norm=0.05)
    assert trainer.state.global_step == 3
    assert [r.step for r in cb.records] == [1, 2, 3]
    assert [r.global_norm for r in cb.records] == pytest.approx(logged(trainer), rel=1e-6)


def test_bf16_records_equal_the_logged_grad_norm(tmp_path):
    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer = train(tmp_path, [cb], bf16=True, max_grad_norm=0.05)
    assert len(cb.records) == 6
    assert [r.global_norm for r in cb.records] == pytest.approx(logged(trainer), rel=1e-6)


def test_resumed_training_continues_exactly(tmp_path):
    options = {"policy": "zclip", "sinks": ["memory"], "profile_every": 2, "keep": 100}
    full = GradWatchCallback(**options)
    train(tmp_path / "full", [full], max_steps=8, save_strategy="no", max_grad_norm=0.5)

    first = GradWatchCallback(**options)
    train(tmp_path / "run", [first], max_steps=8, save_strategy="steps", save_steps=4, max_grad_norm=0.5)
    resumed = GradWatchCallback(**options)
    ckpt = tmp_path / "run" / "out" / "checkpoint-4"
    train(tmp_path / "run", [resumed], max_steps=8, resume=str(ckpt), max_grad_norm=0.5)

    assert [r.step for r in resumed.records] == [5, 6, 7, 8]
    expected = [r.to_dict() for r in full.records[4:]]
    assert [r.to_dict() for r in resumed.records] == expected
    assert [r.to_dict() for r in first.records] == [r.to_dict() for r in full.records]


class _NoTensorFlow:
    """tensorboard imports TensorFlow when it is installed; the torch suite never loads it
    (tensorboard then uses its own stand-in, as on a machine without TensorFlow)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("TensorFlow is kept out of the torch test process")


def test_gradwatch_keys_reach_the_report_to_trackers(tmp_path, monkeypatch):
    if "tensorflow" not in sys.modules:  # (another test module may have loaded it already)
        monkeypatch.setattr(sys, "meta_path", [_NoTensorFlow(), *sys.meta_path])
    ea = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="report_to='tensorboard' needs tensorboard"
    )
    EventAccumulator = ea.EventAccumulator

    cb = GradWatchCallback(policy="fixed", max_norm=0.3, sinks=["memory"], profile_every=0)
    trainer = train(tmp_path, [cb], report_to="tensorboard", logging_steps=2)  # writes under output_dir/runs
    runs = [p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/gradwatch/grad_norm", "train/gradwatch/grad_norm/gru", "train/gradwatch/clip_threshold"} <= set(tags)
    by_step = {r.step: r for r in cb.records}
    points = acc.Scalars("train/gradwatch/grad_norm")
    assert [p.step for p in points] == [2, 4, 6]
    assert [p.value for p in points] == pytest.approx([by_step[p.step].global_norm for p in points], rel=1e-6)
    window = [max(by_step[s].global_norm for s in (k - 1, k)) for k in (2, 4, 6)]
    assert [p.value for p in acc.Scalars("train/gradwatch/grad_norm_max")] == pytest.approx(window, rel=1e-6)
    assert all("gradwatch/grad_norm" in e for e in trainer.state.log_history if "loss" in e)
    assert not any(k.startswith("gradwatch/") for e in trainer.state.log_history if "loss" not in e for k in e)


def test_args_and_model_are_given_back_after_training(tmp_path):
    model = Recall()
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    trainer = train(tmp_path, [cb], model=model, max_grad_norm=0.7)
    assert trainer.args.max_grad_norm == 0.7 and "_gradwatch_held_max_grad_norm" not in vars(trainer.args)
    assert cb.records[0].temporal, "the GRU should have been probed"
    assert cb.watch.attachment is None
    assert not model.gru._forward_pre_hooks and not model.gru._forward_hooks
    gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=["memory"]).close()


def test_raise_on_nonfinite_stops_training_and_gives_everything_back(tmp_path):
    model = Recall(nan_at=3)
    cb = GradWatchCallback(on_nonfinite="raise", sinks=["memory"], profile_every=0)
    with pytest.raises(gradwatch.NonFiniteGradientError) as err:
        train(tmp_path, [cb], model=model, max_grad_norm=0.7)
    assert err.value.step == 3
    assert cb.watch.attachment is None
    args = make_args(tmp_path, max_grad_norm=0.7)
    assert args.max_grad_norm == 0.7
    gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=["memory"]).close()


def test_skipped_nonfinite_step_leaves_the_weights_unchanged(tmp_path):
    class Snap(TrainerCallback):
        def __init__(self) -> None:
            self.before: list[dict] = []
            self.after: list[dict] = []

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.before.append({k: v.clone() for k, v in model.state_dict().items()})

        def on_step_end(self, args, state, control, model=None, **kw):
            self.after.append({k: v.clone() for k, v in model.state_dict().items()})

    snap, cb = Snap(), GradWatchCallback(on_nonfinite="skip", sinks=["memory"], profile_every=0)
    train(tmp_path, [cb, snap], model=Recall(nan_at=3), max_grad_norm=0.7)
    assert [r.skipped for r in cb.records] == [False, False, True, False, False, False]
    assert all(torch.equal(snap.before[2][k], snap.after[2][k]) for k in snap.before[2])
    assert not all(torch.equal(snap.before[3][k], snap.after[3][k]) for k in snap.before[3])


def test_a_transformers_model_built_from_config(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    class Text(torch.utils.data.Dataset):
        x = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(2))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer = Trainer(
        model=model, args=make_args(tmp_path, max_steps=4, max_grad_norm=1.0), train_dataset=Text(), callbacks=[cb]
    )
    trainer.train()
    assert [r.global_norm for r in cb.records] == pytest.approx(logged(trainer), rel=1e-6)
    assert "transformer.h.1.attn.c_attn" in cb.records[0].layer_norms
    assert STATE_KEY not in trainer.state.stateful_callbacks  # only written when a checkpoint is due


def test_propagation_keys_only_on_the_logs_whose_steps_measured_them(tmp_path):
    cb = GradWatchCallback(sinks=["memory"], profile_every=4)  # profiled steps 1, 4 (and 8, 12 ...)
    trainer = train(tmp_path, [cb], logging_steps=1, max_steps=6)
    by_step = {r.step: r for r in cb.records}
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5, 6]
    for e in logs:
        prof = by_step[e["step"]].temporal.get("gru")
        measured = prof is not None and bool(prof.recurrences)
        assert ("gradwatch/horizon/gru" in e) == measured, e["step"]  # step 1's rate is not repeated at 2, 3
        if measured:
            assert e["gradwatch/horizon/gru"] == prof.horizon
            assert e["gradwatch/propagation_rate/gru"] == pytest.approx(prof.gain, rel=1e-6)
    assert "gradwatch/horizon/gru" in logs[0] and "gradwatch/horizon/gru" not in logs[1]
