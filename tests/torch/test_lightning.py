"""gradwatch_torch.lightning.GradWatchCallback inside real Lightning training.

Ground truth is read from ``p.grad`` by callbacks written here (float64 numpy), and from
torch's own optimizer step post-hook (the gradient the optimizer actually applied).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")
L = pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs lightning")

from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

import gradwatch
from gradwatch_torch.lightning import GradWatchCallback

ROOT = Path(__file__).resolve().parents[2]
VOCAB, T, N = 6, 10, 48


class Recall(L.LightningModule):
    """Embedding, LSTM (or GRU), linear head: predict the first token from the last hidden state."""

    def __init__(self, lr: float = 1e-2, opt: str = "adam", scale: float = 10.0, cell: type = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 12, batch_first=True)
        self.head = nn.Linear(12, VOCAB)
        self.lr, self.opt, self.scale = lr, opt, scale

    def loss(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return nn.functional.cross_entropy(self.head(out[:, -1]), tokens[:, 0]) * self.scale

    def training_step(self, batch, batch_idx):
        return self.loss(batch[0])

    def configure_optimizers(self):
        if self.opt == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n: int = N, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (n, T), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def trainer(callbacks, **kw):
    opts = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    opts.update(kw)
    return L.Trainer(callbacks=callbacks, **opts)


def grad_norms(module: nn.Module) -> tuple[float, dict[str, float]]:
    """Global and per-layer (first name component) L2 norms of the current p.grad, float64."""
    layers: dict[str, float] = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            sq = float(np.sum(p.grad.detach().double().numpy() ** 2))
            layers[name.split(".")[0]] = layers.get(name.split(".")[0], 0.0) + sq
    return math.sqrt(sum(layers.values())), {k: math.sqrt(v) for k, v in layers.items()}


class PreStep(L.Callback):
    """Reads the gradient in on_before_optimizer_step (listed before gradwatch: pre-policy)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, dict[str, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append((trainer.global_step, *grad_norms(pl_module)))

    def first_per_step(self):
        out = {}
        for step, g, layers in self.seen:
            out.setdefault(step, (g, layers))
        return [out[k] for k in sorted(out)]


class Applied(L.Callback):
    """The gradient the optimizer applied: torch's step post-hook (after every clip)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda *a, m=pl_module: self.norms.append(grad_norms(m)[0]))


def test_records_are_pre_clip_norms_with_gradient_clip_val():
    pre, applied, cb = PreStep(), Applied(), GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer([pre, cb, applied], gradient_clip_val=0.05).fit(Recall(), loader())
    truth = pre.first_per_step()
    assert len(cb.records) == len(truth) == 6
    for rec, (g, layers) in zip(cb.records, truth):
        assert rec.global_norm == pytest.approx(g, rel=1e-6)
        assert dict(rec.layer_norms) == pytest.approx(layers, rel=1e-6)
    assert min(g for g, _ in truth) > 0.1, "the gradients were too small for gradient_clip_val to act"
    assert max(applied.norms) <= 0.05 * (1 + 1e-5)  # Lightning still clipped what the optimizer used


def _clip_by_hand(max_norm: float):
    class HandClip(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            total, _ = grad_norms(pl_module)
            scale = min(1.0, max_norm / total)
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    return HandClip()


def test_policy_clip_is_what_the_optimizer_applies():
    torch.manual_seed(3)
    watched = Recall()
    by_hand = Recall()
    by_hand.load_state_dict(watched.state_dict())
    pre, applied = PreStep(), Applied()
    cb = GradWatchCallback(policy="fixed", max_norm=0.2, sinks=["memory"], profile_every=0)
    trainer([pre, cb, applied]).fit(watched, loader())
    trainer([_clip_by_hand(0.2)]).fit(by_hand, loader())

    truth = [g for g, _ in pre.first_per_step()]
    assert all(g > 0.2 for g in truth), "every step should have been clipped"
    assert applied.norms == pytest.approx([0.2] * len(truth), rel=1e-5)
    assert all(r.clip.threshold == pytest.approx(0.2) and r.clip.scale < 1 for r in cb.records)
    for (name, a), b in zip(watched.state_dict().items(), by_hand.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_policy_and_gradient_clip_val_tighter_threshold_wins(caplog):
    pre, applied = PreStep(), Applied()
    cb = GradWatchCallback(policy="fixed", max_norm=0.5, sinks=["memory"], profile_every=0)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer([pre, cb, applied], gradient_clip_val=0.1).fit(Recall(), loader())
    assert applied.norms == pytest.approx([0.1] * len(applied.norms), rel=1e-5)
    assert [r.clip.threshold for r in cb.records] == pytest.approx([0.5] * len(cb.records))
    warnings = [r for r in caplog.records if "gradient_clip_val=0.1" in r.getMessage()]
    assert len(warnings) == 1 and "tighter" in warnings[0].getMessage()


def test_one_record_per_optimizer_step_with_accumulation():
    pre, cb = PreStep(), GradWatchCallback(sinks=["memory"], profile_every=0)
    t = trainer([pre, cb], accumulate_grad_batches=3)
    t.fit(Recall(), loader())  # 6 batches -> 2 optimizer steps
    assert t.global_step == 2
    assert [r.step for r in cb.records] == [1, 2]
    assert [r.global_norm for r in cb.records] == pytest.approx([g for g, _ in pre.first_per_step()], rel=1e-6)


def test_accumulated_gradient_is_the_sum_of_the_micro_batches():
    torch.manual_seed(5)
    model = Recall()
    reference = Recall()
    reference.load_state_dict(model.state_dict())
    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer([cb], accumulate_grad_batches=3, max_steps=1).fit(model, loader())
    batches = [b[0] for b, _ in zip(loader(), range(3))]
    loss = sum(reference.loss(x) for x in batches) / 3  # Lightning divides by the accumulation
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert cb.records[-1].global_norm == pytest.approx(expected, rel=1e-5)


def test_bf16_mixed_precision_records_match_the_gradients():
    pre, cb = PreStep(), GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer([pre, cb], precision="bf16-mixed").fit(Recall(), loader())
    assert len(cb.records) == 6
    assert [r.global_norm for r in cb.records] == pytest.approx([g for g, _ in pre.first_per_step()], rel=1e-6)


def test_fp16_steps_the_grad_scaler_skips_are_not_recorded():
    applied, pre, cb = Applied(), PreStep(), GradWatchCallback(sinks=["memory"], profile_every=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # the first steps overflow fp16
    t = trainer([pre, cb, applied], plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    t.fit(Recall(scale=1.0, cell=nn.GRU), loader(n=96))  # oneDNN has no fp16 LSTM on CPU
    assert 0 < len(applied.norms) < t.global_step, "the scaler should have skipped some steps, not all"
    assert len(cb.records) == len(applied.norms)
    assert not cb.events, [e.message for e in cb.events]  # no non-finite alert for the scaler's overflow steps
    unscaled = [g for g, _ in pre.first_per_step() if math.isfinite(g)]
    assert [r.global_norm for r in cb.records] == pytest.approx(unscaled, rel=1e-5)


def test_resumed_fit_continues_exactly(tmp_path):
    options = {"policy": "zclip", "sinks": ["memory"], "profile_every": 0, "keep": 100}
    torch.manual_seed(7)
    init = Recall().state_dict()

    full_cb = GradWatchCallback(**options)
    model = Recall()
    model.load_state_dict(init)
    trainer([full_cb], max_epochs=4).fit(model, loader())

    first_cb = GradWatchCallback(**options)
    model = Recall()
    model.load_state_dict(init)
    t = trainer([first_cb], max_epochs=2)
    t.fit(model, loader())
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)

    second_cb = GradWatchCallback(**options)
    trainer([second_cb], max_epochs=4).fit(Recall(), loader(), ckpt_path=ckpt)

    full = [r.to_dict() for r in full_cb.records]
    resumed = [r.to_dict() for r in first_cb.records] + [r.to_dict() for r in second_cb.records]
    assert [r.step for r in second_cb.records] == list(range(13, 25))
    assert resumed == full
    assert json.loads(json.dumps(second_cb.state_dict())) == full_cb.state_dict()


class SpyLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "spy"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_logged_keys_reach_every_lightning_logger():
    spy = SpyLogger()
    cb = GradWatchCallback(policy="fixed", max_norm=0.3, sinks=["memory"], profile_every=0)
    trainer([cb], logger=spy, log_every_n_steps=2).fit(Recall(), loader())
    rows = [(step, m) for step, m in spy.rows if "gradwatch/grad_norm" in m]
    assert len(rows) == 3  # 6 steps, a logger write every 2
    by_step = {r.step: r for r in cb.records}
    for step, m in rows:
        rec = by_step[step + 1]  # Lightning logs with the count of steps before this one
        assert m["gradwatch/grad_norm"] == pytest.approx(rec.global_norm, rel=1e-6)
        for layer in ("embed", "rnn", "head"):
            assert m[f"gradwatch/grad_norm/{layer}"] == pytest.approx(rec.layer_norms[layer], rel=1e-6)
        assert m["gradwatch/clip_threshold"] == pytest.approx(0.3)
        assert m["gradwatch/clip_scale"] == pytest.approx(rec.clip.scale)
        window = [r.global_norm for r in cb.records if step - 1 < r.step <= step + 1]
        assert m["gradwatch/grad_norm_max"] == pytest.approx(max(window), rel=1e-6)
        assert m["gradwatch/clipped_steps"] == sum(
            1 for r in cb.records if step - 1 < r.step <= step + 1 and r.clip.scale < 1
        )


def test_log_layers_false_keeps_layer_keys_out():
    spy = SpyLogger()
    trainer(
        [GradWatchCallback(log_layers=False, sinks=["memory"], profile_every=0)], logger=spy, log_every_n_steps=2
    ).fit(Recall(), loader())
    keys = set().union(*(m for _, m in spy.rows))
    assert "gradwatch/grad_norm" in keys
    assert not [k for k in keys if k.startswith("gradwatch/grad_norm/")]


def test_nothing_is_left_attached_after_fit():
    model = Recall()
    cb = GradWatchCallback(sinks=["memory"], profile_every=1)
    trainer([cb]).fit(model, loader())
    assert cb.records[0].temporal, "the LSTM should have been probed"
    assert cb.watch.attachment is None
    assert not model.rnn._forward_pre_hooks and not model.rnn._forward_hooks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gradwatch.watch(model, opt, sinks=["memory"]).close()  # watchable again: nothing holds it


def test_manual_optimization_records_each_optimizer_step():
    class Manual(Recall):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.at_step: list[float] = []

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(self.loss(batch[0]) / 2)
            if batch_idx % 2 == 1:  # accumulate two batches by hand
                self.at_step.append(grad_norms(self)[0])
                opt.step()
                opt.zero_grad()

    model, cb = Manual(), GradWatchCallback(sinks=["memory"], profile_every=0)
    trainer([cb]).fit(model, loader())
    assert len(model.at_step) == 3
    assert [r.global_norm for r in cb.records] == pytest.approx(model.at_step, rel=1e-6)


def test_lbfgs_records_the_first_closure_evaluation_once_per_step():
    pre, cb = PreStep(), GradWatchCallback(sinks=["memory"], profile_every=0)
    t = trainer([pre, cb], max_steps=3)
    t.fit(Recall(opt="lbfgs"), loader())
    assert len(pre.seen) > t.global_step, "LBFGS should have evaluated the closure several times per step"
    assert [r.global_norm for r in cb.records] == pytest.approx([g for g, _ in pre.first_per_step()], rel=1e-6)


def test_policy_with_lbfgs_is_refused_at_fit_start():
    cb = GradWatchCallback(policy="zclip", sinks=["memory"])
    with pytest.raises(gradwatch.ConfigError, match="LBFGS"):
        trainer([cb], max_steps=2).fit(Recall(opt="lbfgs"), loader())
    assert cb.watch.attachment is None and not cb.records


def test_policy_with_two_optimizers_is_refused_at_fit_start():
    class Two(Recall):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            for opt in self.optimizers():
                opt.zero_grad()
                self.manual_backward(self.loss(batch[0]))
                opt.step()

        def configure_optimizers(self):
            return [torch.optim.SGD(self.rnn.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]

    with pytest.raises(gradwatch.ConfigError, match="2 optimizers"):
        trainer([GradWatchCallback(policy="fixed", sinks=["memory"])], max_steps=2).fit(Two(), loader())


def test_ddp_ranks_record_the_same_and_only_rank0_writes(tmp_path):
    from torch_helpers import run_ranks

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_ranks([Path(__file__).with_name("lightning_ddp_worker.py"), tmp_path], cwd=tmp_path, env=env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["records"] == ranks[1]["records"]
    assert len(ranks[0]["records"]) == 4
    for rank in ranks:  # each rank's records equal that rank's all-reduced p.grad
        assert [n for _, n in rank["records"]] == pytest.approx(rank["truth"], rel=1e-6)
    header = json.loads((tmp_path / "run.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2 and header["rank"] == 0


def test_the_pytorch_lightning_package_works_too():
    pl = pytest.importorskip("pytorch_lightning", reason="the second Lightning package is not installed")

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def training_step(self, batch, batch_idx):
            out, _ = self.rnn(batch[0])
            return out.square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen: list[float] = []

    class Truth(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(grad_norms(pl_module)[0])

    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 5, 3)), batch_size=2)
    pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Truth(), cb],
    ).fit(Plain(), data)
    assert [r.global_norm for r in cb.records] == pytest.approx(seen, rel=1e-6) and len(seen) == 3


def test_pickling_keeps_options_and_state_for_ddp_spawn():
    import pickle

    cb = GradWatchCallback(policy="zclip", log_layers=False, sinks=["memory"], profile_every=0)
    trainer([cb]).fit(Recall(), loader())
    copy = pickle.loads(pickle.dumps(cb))
    assert copy is not cb and copy.monitor.policy.name == "zclip" and copy._metrics.layers is False
    assert copy.state_dict() == cb.state_dict()
    assert copy.monitor.step_count == 6 and copy.watch.attachment is None


def test_a_policy_with_a_closure_evaluated_twice_warns_that_only_the_first_is_clipped(caplog):
    class Twice(torch.optim.SGD):
        """SAM-like: evaluates the closure twice per step and applies the second gradient."""

        def step(self, closure=None):
            closure()
            loss = closure()
            super().step()
            return loss

    class TwiceModel(Recall):
        def configure_optimizers(self):
            return Twice(self.parameters(), lr=0.01)

    pre, cb = PreStep(), GradWatchCallback(policy="fixed", max_norm=0.05, sinks=["memory"], profile_every=0)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        t = trainer([pre, cb], max_steps=3)
        t.fit(TwiceModel(), loader())
    assert len(pre.seen) == 6 and len(cb.records) == 3
    assert [r.global_norm for r in cb.records] == pytest.approx([g for g, _ in pre.first_per_step()], rel=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(warnings) == 1 and "Twice" in warnings[0]


def test_callback_metrics_hold_the_keys_without_a_logger_and_early_stopping_can_monitor_them():
    from lightning.pytorch.callbacks import EarlyStopping

    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    # patience 0 and a huge min_delta: the first epoch's check sets the best value, the second one stops
    # training, which only happens if EarlyStopping found "gradwatch/grad_norm" (a missing key raises).
    stop = EarlyStopping(
        monitor="gradwatch/grad_norm", mode="min", patience=0, min_delta=1e9, check_on_train_epoch_end=True
    )
    t = trainer([cb, stop], logger=False, max_epochs=5, log_every_n_steps=50)
    t.fit(Recall(), loader())
    assert float(t.callback_metrics["gradwatch/grad_norm"]) == pytest.approx(cb.records[-1].global_norm, rel=1e-6)
    assert "gradwatch/grad_norm/rnn" in t.callback_metrics  # per-layer keys follow log_layers (3 layers here)
    assert stop.stopped_epoch == 1 and t.current_epoch == 2 and len(cb.records) == 12  # 6 steps an epoch



@pytest.mark.parametrize("every", [1, 3])
def test_propagation_keys_reach_the_logger_only_from_windows_that_measured_them(every):
    spy = SpyLogger()
    cb = GradWatchCallback(sinks=["memory"], profile_every=4)  # profiled steps 1 and 4
    trainer([cb], logger=spy, log_every_n_steps=every).fit(Recall(), loader())
    merged: dict[int, dict[str, float]] = {}
    for step, m in spy.rows:  # the propagation keys come in a row of their own, at the same step
        merged.setdefault(step + 1, {}).update(m)  # Lightning's logger step counts the steps before this one
    rows = sorted((s, m) for s, m in merged.items() if "gradwatch/grad_norm" in m)
    assert [s for s, _ in rows] == list(range(every, 7, every)) and len(merged) == len(rows)
    by_step = {r.step: r for r in cb.records}
    for step, m in rows:
        window = [by_step[s] for s in range(step - every + 1, step + 1)]
        measured = [r.temporal["rnn"] for r in window if "rnn" in r.temporal and r.temporal["rnn"].recurrences]
        assert ("gradwatch/horizon/rnn" in m) == bool(measured), step  # never a stale value from an older window
        if measured:
            assert m["gradwatch/horizon/rnn"] == measured[-1].horizon
            assert m["gradwatch/propagation_rate/rnn"] == pytest.approx(measured[-1].gain, rel=1e-6)
