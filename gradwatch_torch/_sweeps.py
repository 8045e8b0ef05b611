"""The backward sweep of a replay: from one recurrence's per-step Jacobian actions
(:mod:`gradwatch_torch._replay`) to the two numbers of the contract for every j.

See :mod:`gradwatch_torch._replay` for what is measured and why; here is how: a block of
row vectors carried from s_T back to s_1 with the transposed Jacobians, its Gram matrix
kept at each step (the largest eigenvalue gives the largest singular value, the trace the
Frobenius norm), the block's dominant rows found by random tangents carried forward, and
the per-sequence logs combined by the engine's rule (:func:`gradwatch.through_time.aggregate`)
on the device, and across ranks under DDP (:func:`combine_ranks`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gradwatch.through_time import aggregate
from gradwatch.through_time.plan import EXACT_DIM, RENORM_EVERY, complement_probes, dominant_starts
from gradwatch_torch._probing import one_thread
from gradwatch_torch._replay import Coefficients, _jvp, _per_step, _split, _vjp
from gradwatch_torch._tensor_ops import TORCH_TENSORS
from gradwatch_torch._tensors import _profile_dtype

__all__ = ["combine_ranks", "gains"]

_TINY = 1e-30


def _sq(uh: Tensor, uc: Tensor | None) -> Tensor:
    s = uh.square().sum(dim=-1)
    return s if uc is None else s + uc.square().sum(dim=-1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _sweep(co: Coefficients, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Carry the row block ``rows`` (P, K, d) at s_T back to s_1.

    Returns, for every j = 0 .. T-1, the Gram matrix of the block at s_{T-j} (T, P, K, K)
    in float64 (float32 on MPS) and the log scale (T, P) it is relative to: the block is
    rescaled by its largest row every few steps (one scale per sequence, so the Gram
    matrix keeps the rows' relative sizes), so a vanishing or exploding product never
    underflows or overflows float32.
    """
    T = co.h_check.shape[0]
    a, g, f, v = _per_step(co)
    uh, uc = _split(rows, co)
    wide = _profile_dtype(rows)
    log_scale = torch.zeros(rows.shape[0], dtype=wide, device=rows.device)

    def gram(bh: Tensor, bc: Tensor | None) -> Tensor:
        full = bh if bc is None else torch.cat([bh, bc], dim=-1)
        return (full @ full.transpose(-1, -2)).to(wide)

    grams: list[Tensor] = [gram(uh, uc).unsqueeze(0)]
    scales: list[Tensor] = [log_scale.unsqueeze(0)]
    hs: list[Tensor] = []
    cs: list[Tensor] = []
    for t in range(T - 1, 0, -1):
        uh, uc = _vjp(co, a[t], g[t], f[t], v[t], uh, uc)
        hs.append(uh)
        if uc is not None:
            cs.append(uc)
        if len(hs) == RENORM_EVERY or t == 1:  # the Gram matrices of the last few steps, in bulk
            block = gram(torch.stack(hs), torch.stack(cs) if cs else None)  # (n, P, K, K)
            grams.append(block)
            scales.append(log_scale.expand(block.shape[0], -1))
            hs, cs = [], []
            top = torch.diagonal(block[-1], dim1=-2, dim2=-1).amax(dim=-1).sqrt()  # largest row norm, (P,)
            norm = torch.where(torch.isfinite(top) & (top > _TINY), top, torch.ones_like(top))
            log_scale = log_scale + norm.log()
            scale = norm.to(uh.dtype).view(-1, 1, 1)
            uh = uh / scale
            uc = uc / scale if uc is not None else None
    return torch.cat(grams, dim=0), torch.cat(scales, dim=0)


def _tangents(co: Coefficients, generator: torch.Generator, offsets: list[int]) -> Tensor:
    """Random tangents started ``offsets[k]`` steps before the end and carried forward to
    s_T, as an orthonormal block (P, K, d): the directions the products over about that
    many steps amplify most (one step of power iteration from a random start each)."""
    T, P, d = co.h_check.shape[0], co.h_check.shape[1], co.dim
    dev, dt = co.h_check.device, co.h_check.dtype
    a, g, f, v = _per_step(co)
    starts = sorted(T - m for m in offsets)  # a tangent joins the block at its start step
    seeds = _unit(torch.randn(P, len(starts), d, generator=generator, dtype=torch.float32).to(device=dev, dtype=dt))
    w = seeds[:, :0]
    for k, t in enumerate(range(starts[0], T)):
        active = sum(1 for s0 in starts if s0 <= t)
        if active > w.shape[1]:
            w = torch.cat([w, seeds[:, w.shape[1] : active]], dim=1)
        nh, nc = _jvp(co, a[t], g[t], f[t], v[t], *_split(w, co))
        w = nh if nc is None else torch.cat([nh, nc], dim=-1)
        if (k + 1) % RENORM_EVERY == 0 or t == T - 1:
            n = w.norm(dim=-1, keepdim=True)
            good = torch.isfinite(n) & (n > _TINY)
            w = torch.where(good, w / n.clamp_min(_TINY), seeds[:, : w.shape[1]])  # a dead tangent: any unit vector
    w = _refine_short(co, w, sorted(offsets), a, g, f, v)
    # Orthonormal basis of the block at s_T (QR in float64).
    wide = torch.float64 if dev.type != "mps" else dt
    return torch.linalg.qr(w.transpose(-1, -2).to(wide))[0].transpose(-1, -2).to(dt)


#: Tangents over at most this many steps get more power iterations (back and forth over
#: their own steps): short products are where one iteration from a random start is
#: weakest (no long product has yet made one direction dominate), and they are cheap.
REFINE_STEPS = 16
REFINE_ROUNDS = 2


def _refine_short(
    co: Coefficients, w: Tensor, offsets: list[int], a: list[Any], g: list[Any], f: list[Any], v: list[Any]
) -> Tensor:
    """More power iterations (u <- A A^T u over each tangent's own steps) for the tangents
    started at most ``REFINE_STEPS`` steps before the end. ``w`` (P, K, d) holds the
    tangents in order of increasing start step, i.e. decreasing offset."""
    T = co.h_check.shape[0]
    short = [k for k, m in enumerate(sorted(offsets, reverse=True)) if m <= REFINE_STEPS]
    if not short:
        return w
    first = short[0]
    lengths = sorted(offsets, reverse=True)[first:]  # decreasing
    u = w[:, first:]
    for _ in range(REFINE_ROUNDS):
        # back over the longest one's steps; a row only while within its own steps
        for t in range(T - 1, T - 1 - lengths[0], -1):
            rows = sum(1 for m in lengths if t >= T - m)
            nh, nc = _vjp(co, a[t], g[t], f[t], v[t], *_split(u[:, :rows], co))
            u = torch.cat([nh if nc is None else torch.cat([nh, nc], dim=-1), u[:, rows:]], dim=1)
        for t in range(T - lengths[0], T):
            rows = sum(1 for m in lengths if t >= T - m)
            nh, nc = _jvp(co, a[t], g[t], f[t], v[t], *_split(u[:, :rows], co))
            u = torch.cat([nh if nc is None else torch.cat([nh, nc], dim=-1), u[:, rows:]], dim=1)
        n = u.norm(dim=-1, keepdim=True)
        u = torch.where(torch.isfinite(n) & (n > _TINY), u / n.clamp_min(_TINY), w[:, first:])
    return torch.cat([w[:, :first], u], dim=1)


def gains(co: Coefficients, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(gains, max_gains), each (T,) float64, j = 0 .. T-1 (see the module docstring).

    Exact for ``dim s <= EXACT_DIM``. Above, measured against exact products on the test
    cases of ``tests/torch/test_torch_propagation.py``: ``max_gains`` (a lower bound) within
    a factor 1.5 of exact at every j, ``gains`` within a factor 1.5 at every j and 1.25 for
    95% of probe seeds. The sweeps are chains of small products: they run on one CPU
    thread (:func:`~gradwatch_torch._probing.one_thread`).
    """
    with one_thread(co.h_check.device.type):
        log_rms, log_top = _sequence_logs(co, generator)
    return aggregate(log_rms, log_top, TORCH_TENSORS)


def _largest_eigenvalue(gram: Tensor) -> Tensor:
    """Largest eigenvalue of symmetric PSD matrices (..., K, K); NaN where not finite."""
    ok = torch.isfinite(gram).flatten(-2).all(dim=-1)
    safe = torch.where(ok[..., None, None], gram, torch.zeros_like(gram))
    top = torch.linalg.eigvalsh(safe)[..., -1].clamp_min(0.0)
    return torch.where(ok, top, torch.full_like(top, math.nan))


def low_precision(co: Coefficients) -> Coefficients:
    """``co`` with its weights in bfloat16 for the estimate's sweeps, where that is faster.

    The sweeps' cost is their matrix products (a block of rows times the recurrent
    weights, once per step); on a CPU with AVX512-BF16 a product of 64 rows with an LSTM
    256's weights runs about twice as fast in bfloat16, the whole sweeps of the benchmark's
    W1 1.3-1.5x (benchmarks/RESULTS.md, issue 16). Only the products: the carried rows, the coefficients and the Gram
    matrices stay float32, the rows are rounded to bfloat16 as they enter a product (a
    relative error of 2^-9 per step, against the estimate's own factor 1.25). The exact
    path (dim s <= EXACT_DIM) and float64 layers keep their dtype.
    """
    if not LOW_PRECISION or co.w_hh.dtype != torch.float32 or co.w_hh.numel() < LOW_PRECISION_SIZE:
        return co
    if not _bf16_is_fast(co.w_hh.device):
        return co
    lp = torch.bfloat16
    return replace(co, w_hh=co.w_hh.to(lp), w_hr=co.w_hr.to(lp) if co.w_hr is not None else None)


def _bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 products run natively (AVX512-BF16 on the CPU; CUDA)."""
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


#: Run the estimate's sweep products in bfloat16 where it is faster (:func:`low_precision`):
#: for recurrent weights of at least this many entries (an LSTM of 256 units has 2^18;
#: below, a bfloat16 product of a few rows costs as much as a float32 one or more).
LOW_PRECISION = True
LOW_PRECISION_SIZE = 1 << 18


def _sequence_logs(co: Coefficients, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sequence (T, P) logs of the RMS gain and of the largest singular value."""
    T, P, d = co.h_check.shape[0], co.h_check.shape[1], co.dim
    dev, dt = co.h_check.device, co.h_check.dtype
    if d > EXACT_DIM:
        co = low_precision(co)
    if d <= EXACT_DIM:
        rows = torch.eye(d, dtype=dt, device=dev).expand(P, d, d).contiguous()
        grams, log_scale = _sweep(co, rows)
        trace = torch.diagonal(grams, dim1=-2, dim2=-1).sum(dim=-1)
        with torch.no_grad():
            log_rms = 0.5 * (trace.log() - math.log(d)) + log_scale
            log_top = 0.5 * _largest_eigenvalue(grams).log() + log_scale
        return log_rms, log_top
    q = (
        _tangents(co, generator, dominant_starts(T))
        if T > 1
        else _unit(torch.randn(P, 1, d, generator=generator).to(device=dev, dtype=dt))
    )
    kq = q.shape[1]
    r = complement_probes(P)
    v = torch.randn(P, r, d, generator=generator, dtype=torch.float32).to(device=dev, dtype=dt)
    v = v - (v @ q.transpose(-1, -2)) @ q  # orthogonal to the dominant block
    v = (
        torch.linalg.qr(v.transpose(-1, -2).to(q.dtype if dev.type == "mps" else torch.float64))[0]
        .transpose(-1, -2)
        .to(dt)
    )
    grams, log_scale = _sweep(co, torch.cat([q, v], dim=1))
    diag = torch.diagonal(grams, dim1=-2, dim2=-1)
    fro = diag[..., :kq].sum(dim=-1) + diag[..., kq:].sum(dim=-1) * ((d - kq) / r)
    log_rms = 0.5 * (fro.log() - math.log(d)) + log_scale
    log_top = 0.5 * _largest_eigenvalue(grams).log() + log_scale  # every row is orthonormal at s_T: a lower bound
    return log_rms, log_top


def combine_ranks(
    world: int, device: torch.device, sizes: list[int], measured: list[tuple[Tensor, Tensor]]
) -> list[tuple[Tensor, Tensor]] | None:
    """Every rank's (gains, max_gains) replaced by the same numbers on every rank.

    Each rank replays the first sequences of its own slice of the batch. ``max_gains``
    becomes the max over the ranks (the max over every rank's probed sequences, exactly
    the contract's rule); ``gains``, the median on each rank, becomes the geometric mean
    of those medians (an approximation of the median over all of them: the medians of
    ranks that probe as many sequences). ``sizes`` has one entry per probe, the same
    probes in the same order on every rank (0: nothing this step); one MAX all-reduce over
    [sizes, -sizes] checks that all ranks hold the same, and if not, this step's
    propagation is dropped on every rank (empty list). Returns None when a collective
    fails (then propagation stays local from now on).
    """
    import logging

    dist = torch.distributed
    try:
        meta = torch.tensor([float(v) for v in sizes] + [-float(v) for v in sizes], dtype=torch.float64, device=device)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX)
        n = len(sizes)
        if not torch.equal(meta[:n], -meta[n:]) or meta[:n].tolist() != [float(v) for v in sizes] or not measured:
            return []
        counts = [int(g.numel()) for g, _ in measured]
        logs = (
            torch.cat([g.reshape(-1).to(device=device, dtype=torch.float64) for g, _ in measured])
            .clamp_min(1e-300)
            .log()
        )
        tops = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for _, t in measured])
        dist.all_reduce(logs, op=dist.ReduceOp.SUM)
        dist.all_reduce(tops, op=dist.ReduceOp.MAX)
        mean = (logs / float(world)).exp()  # from the reduced sum only: the same on every rank
        return list(zip(torch.split(mean, counts), torch.split(tops, counts)))
    except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
        logging.getLogger("gradwatch").error(
            "gradwatch: combining the propagation gains across ranks failed (%s: %s); propagation is local to each "
            "rank from now on.",
            type(exc).__name__,
            exc,
        )
        return None
