"""Run files of real PyTorch loops: every step kept when the loop raises with no
``with``, resumption onto the same path, and a report that says what gradwatch cannot
see (a user's own ``clip_grad_norm_``). References: ``torch.nn.utils.get_total_norm``
and ``clip_grad_norm_`` in the same loop, and an unwatched run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib", reason="the plots of gradwatch report need matplotlib")

import gradwatch
from gradwatch.cli import main


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(1, keepdim=True) * 3.0


def _train(model, opt, steps, *, norms=None, clip=None):
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert float(total) > clip  # the user's clipping really acts on every step
        if norms is not None:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()


def test_users_own_clip_grad_norm_is_reported_as_a_ceiling_not_as_no_clipping(tmp_path, capsys):
    path = tmp_path / "clipped.jsonl"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, sinks=[f"jsonl:{path}"]):
        _train(model, opt, range(100), clip=0.05)
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "sits at 0.05 on 100 of 100 steps" in out and "clip_grad_norm_" in out
    assert "clipped 0/100" not in out


def test_heatmap_rows_of_a_real_sequential_can_be_found(tmp_path):
    from gradwatch.cli.plots import layer_labels

    path = tmp_path / "seq.jsonl"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, sinks=[f"jsonl:{path}"], log_every=5):
        _train(model, opt, range(10))
    run = gradwatch.read_run(path)
    got = layer_labels(run, ["0", "2"])
    assert got in (["0 (Linear)", "2 (Linear)"], ["0 (weight, bias)", "2 (weight, bias)"])


def test_loop_that_raises_without_with_or_close_keeps_every_step(tmp_path):
    path = tmp_path / "run.jsonl"
    ref = tmp_path / "ref.json"
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).resolve().parents[2])!r})
        import torch, gradwatch
        from tests.cli.test_runfile_torch import _model, _batch
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        watch = gradwatch.watch(model, opt, sinks=["jsonl:{path}"])  # default log_every=50
        norms = []
        for step in range(100):
            if step == 25:
                json.dump(norms, open({str(ref)!r}, "w"))
                raise OverflowError("loss overflowed at batch 25")
            x, y = _batch(step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            opt.step()
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1 and "OverflowError" in res.stderr, res.stderr
    expected = json.loads(ref.read_text())
    steps = gradwatch.read_run(path).steps
    assert steps.step.tolist() == list(range(1, 26))
    assert steps.global_norm.tolist() == pytest.approx(expected, rel=1e-5)


def test_readme_resume_recipe_continues_the_file_as_one_run(tmp_path):
    """Checkpoint at 30, crash at 45, resume from the checkpoint onto the same path: the
    file reads as steps 1..60 with the norms of an uninterrupted, unwatched run."""
    reference: list[float] = []
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, range(60), norms=reference)

    path = tmp_path / "run.jsonl"
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gradwatch.watch(model, opt, sinks=[f"jsonl:{path}"], log_every=20)
    _train(model, opt, range(30))
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "gradwatch": json.loads(json.dumps(watch.state_dict()))}
    ckpt = {k: (v if k == "gradwatch" else __import__("copy").deepcopy(v)) for k, v in ckpt.items()}
    with pytest.raises(RuntimeError), watch:
        _train(model, opt, range(30, 45))
        raise RuntimeError("node lost")

    model = _model(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with gradwatch.watch(model, opt, sinks=[f"jsonl:{path}"], log_every=20) as watch:
        watch.load_state_dict(ckpt["gradwatch"])
        _train(model, opt, range(30, 60))

    run = gradwatch.read_run(path)
    assert run.steps.step.tolist() == list(range(1, 61)) and run.resumed_at == [30]
    assert run.steps.global_norm.tolist() == pytest.approx(reference, rel=1e-5)
    assert [r.step for r in run.records] == [20, 40, 60]
