"""DDP and FSDP2 (fully_shard) with two gloo processes on 127.0.0.1: every rank records
the same thing, and it equals an unsharded reference that sees both ranks' batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

import gradwatch
import gradwatch_torch
from torch_helpers import run_ranks

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run_worker(mode, tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp(mode) / "result.json"
    run_ranks([HERE / "dist_worker.py", mode, out], cwd=ROOT)
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def result(request, tmp_path_factory):
    return _run_worker(request.param, tmp_path_factory)


def test_ddp_nan_on_one_rank_is_skipped_on_every_rank(tmp_path_factory):
    """Issue 15: a NaN put into rank 1's gradient after the all-reduce, on_nonfinite="skip":
    both ranks skip the step, the replicas stay equal, and equal to an unwatched run that
    skipped that step (clip_grad_norm_ on the others)."""
    rank0, rank1 = _run_worker("ddp_nan", tmp_path_factory)["ranks"]
    assert rank0["skipped"] == rank1["skipped"] == [False, True, False]
    assert rank0["clip"] == rank1["clip"]
    assert rank0["weights"] == rank1["weights"]
    assert rank0["ref_diff"] < 1e-6 and rank1["ref_diff"] < 1e-6


def test_every_rank_records_the_same(result):
    rank0, rank1 = result["records"]
    assert rank0 == rank1
    assert rank0[0]["temporal"] and rank0[0]["spectral"] and rank0[0]["gates"]


def test_norms_equal_the_unsharded_reference(result):
    for rec, ref in zip(result["records"][0], result["ref_norms"]):
        assert rec["param_norms"] == pytest.approx(ref, rel=1e-5)


def test_profile_is_that_of_the_global_batch(result):
    for rec, ref in zip(result["records"][0], result["ref_temporal"]):
        assert rec["temporal"]["gru"] == pytest.approx(ref, rel=1e-4)


def test_fixed_clipping_matches_clip_grad_norm_on_the_global_gradient(result):
    assert all(rec["clip"] is not None and rec["clip"] < 1 for rec in result["records"][0])
    assert max(result["weight_diff"].values()) < 1e-6


def test_fsdp1_is_refused_with_a_clear_error():
    from torch import nn

    FullyShardedDataParallel = type("FullyShardedDataParallel", (nn.Linear,), {})
    with pytest.raises(gradwatch.GradwatchError, match="FSDP1"):
        gradwatch_torch.watch(FullyShardedDataParallel(3, 3), sinks=["memory"])
