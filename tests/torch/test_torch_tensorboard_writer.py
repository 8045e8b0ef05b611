"""gradwatch writes into the user's own torch.utils.tensorboard.SummaryWriter."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")
pytest.importorskip("torch.utils.tensorboard", reason="torch's SummaryWriter needs the tensorboard package")
ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from torch.utils.tensorboard import SummaryWriter
from torch_helpers import SeqRegressor

import gradwatch


def test_users_summary_writer_gets_norms_and_alerts_beside_its_own_scalars(tmp_path):
    model = SeqRegressor(torch.nn.GRU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    x = torch.randn(6, 3, 4)
    truth = []
    with gradwatch.watch(model, opt, log_every=2, on_nonfinite="skip", sinks=[gradwatch.TensorBoardSink(writer=writer)]):
        for step in range(1, 5):
            opt.zero_grad()
            loss = model(x if step != 3 else x * math.nan)
            loss.backward()
            writer.add_scalar("loss", loss.item(), step)  # the user's own curve, same writer
            truth.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters())))
            opt.step()
    writer.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    assert {"loss", "grad_norm/global", "grad_norm/rnn", "grad_norm/head"} <= set(acc.Tags()["scalars"])
    norms = {e.step: e.value for e in acc.Scalars("grad_norm/global")}
    assert norms[2] == pytest.approx(truth[1], rel=1e-5)
    assert norms[4] == pytest.approx(truth[3], rel=1e-5)  # a flushed record carries its own step's norm
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"] if tag.startswith("alerts/nonfinite")}
    assert len(texts) == 1  # torch's add_text appends '/text_summary' to the tag
    (events,) = texts.values()
    assert [e.step for e in events] == [3]
    assert "Non-finite gradient" in events[0].tensor_proto.string_val[0].decode()
