"""Diagonal (gated linear) recurrences, exact from their decays: minGRU, minLSTM, Mamba,
Mamba-2, xLSTM's mLSTM, RG-LRU, flash-linear-attention's GLA, HGRN and RWKV-6 (their
decays in :mod:`._fla`), and any layer declared with
``register_recurrence(T, decay=fn)`` (xLSTM's sLSTM, dense, is in :mod:`._slstm`).

For h_t = a_t * h_{t-1} + b_t the state Jacobian product is diag(prod a_k), so propagation
is a reverse cumulative sum of log a_t (:func:`gradwatch.through_time.diagonal_propagation`).
The probe needs only log a_t for the probed sequences (the first ``min(B, 8)``), and it
reads it from what the forward saw: the layer's input and parameters, never its state (a
fused kernel, mamba-ssm's CUDA scan or mingru's log-space scan, hides the state but not
the input). A built-in decay whose input is the output of a submodule the forward calls
(minGRU's gate projection, mambapy's ``x_proj``, Mamba-2's ``in_proj``) takes that
output's probed rows from a forward hook on the submodule instead of recomputing it, and
recomputes it from the layer's input when the submodule did not run (mamba-ssm's fused
path calls ``x_proj``'s weight, not the module). On a profiled step the first call of the
layer with two or more steps is measured, in its forward hook under ``no_grad``, on the
probed rows only (every batch-shaped argument is cut to them first).

*Cost* (``benchmarks/modern_cost.py``; issue 17's section of ``benchmarks/RESULTS.md``):
a fixed amount per layer and profiled step, whatever the batch: the decays of 8 rows, one
reverse cumulative sum and, for Mamba, the RMS over the (ED, N) state (8 x T x ED x N
terms: base-2 exponentials with a floored exponent, a cache-sized block of steps at a
time). So its share of a training step falls as 1/B.

Built-in decays, each checked against autograd on the package's own scan
(tests/torch/test_modern.py):

* ``minGRU`` (mingru-pytorch): a_t = 1 - z_t, log a_t = -softplus(gate), the gate half of
  ``to_hidden_and_gate(x)``; state (D,).
* ``minLSTM``: a_t = f'_t = f / (f + i), log a_t = -softplus(softplus(-f) - softplus(-i));
  state (D,).
* Mamba (mambapy ``MambaBlock``; mamba-ssm's ``Mamba`` has the same parameters and is read
  the same way, untested here: no CPU path): a_t = exp(Δ_t A) per (channel, state),
  Δ = softplus(dt_proj(x_proj(silu(conv(in_proj(u)))))), A = -exp(A_log); state (ED, N).
* Mamba-2 (mambapy ``Mamba2Block``, mamba-ssm ``Mamba2`` / ``Mamba2Simple``; both import
  mamba-ssm's Triton kernels, so no CPU path: tested on mambapy's block with pure-torch
  stand-ins for those kernels): a_t = exp(Δ_t A_h), one A per head, Δ from the dt columns
  of ``in_proj``; state (H, P, N), the decay shared by each head's P x N entries.
* mLSTM (xlstm ``mLSTMCell``, the package's stabilised recurrent form): the stored state
  C~_t = C_t exp(-m_t) decays by exp(log sigmoid(f_t) + m_{t-1} - m_t), with
  m_t = max(log sigmoid(f_t) + m_{t-1}, i_t), m_0 = 0; one decay per head.
* RG-LRU (recurrentgemma ``RGLRU``): a_t = a^(c r_t), log a_t = -8 r_t softplus(Λ), 0 at a
  document boundary; state (D,). Tested on the package's torch ``rnn_scan`` where it
  imports (its top-level package imports jax/flax, which ``recurrentgemma[torch]`` does
  not install).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradwatch.through_time.families import GATES, Recurrence
from gradwatch.through_time.fit import aggregate
from gradwatch_torch._fla import FLA
from gradwatch_torch._probing import CleanCopies, Hook, ProbeContext, capturing, outside_backward, probe_input
from gradwatch_torch._recurrent import Probe, add_profiles
from gradwatch_torch._tensor_ops import TORCH_TENSORS
from gradwatch_torch._tensors import timestep_sq_norms
from gradwatch_torch._trajectory import PROBED

__all__ = [
    "BUILTIN",
    "SLSTM",
    "DiagonalProbe",
    "mamba2_decay",
    "mamba_decay",
    "mingru_decay",
    "minlstm_decay",
    "mlstm_decay",
    "rglru_decay",
    "stabilised_log_forget",
]


def _rows(value: Any, batch: int, probed: int) -> Any:
    """``value`` with every batch-shaped tensor (first dimension ``batch``) cut to its
    first ``probed`` rows and detached; tuples, lists and dicts are walked."""
    if isinstance(value, Tensor):
        return value[:probed].detach() if value.dim() >= 1 and value.shape[0] == batch else value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, batch, probed) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        return {k: _rows(v, batch, probed) for k, v in value.items()}
    return value


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Tensor | None, int | str | None]:
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            return a, i
    for k, a in kwargs.items():
        if isinstance(a, Tensor):
            return a, k
    return None, None


class DiagonalProbe(Probe):
    """Probe of a diagonal recurrence declared with a ``decay`` (see the module docstring).

    Sensitivity: the gradient of the layer's first tensor argument, taken as (B, T, ...)
    batch-first. Propagation: ``(("l0",), gains[None], max_gains[None])``, exact.
    """

    def __init__(self, name: str, module: nn.Module, ctx: ProbeContext, spec: Recurrence) -> None:
        super().__init__(name, module, ctx)
        self.kind = spec.kind
        self.gates = ("",)
        self.gate_name = spec.gate or GATES.get(spec.kind, "decay")
        self._decay = spec.decay
        self._sq: Tensor | None = None
        self._prop: tuple[tuple[str, ...], Tensor, Tensor] | None = None
        self._measured = False  # propagation measured on this step already
        self._inner: Tensor | None = None  # probed rows of the captured submodule's output, this call
        self._undo: list[Any] = []
        names = tuple(getattr(spec.decay, "capture", ()))
        sub = next((m for m in (getattr(module, n, None) for n in names) if isinstance(m, nn.Module)), None)
        if sub is not None:  # read the decay's input from the forward instead of recomputing it
            handle = sub.register_forward_hook(Hook(self, "inner_hook"))
            self._undo = [handle.remove, CleanCopies.add(sub, [handle.id])]

    def inner_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The captured submodule's output (its probed rows, detached), for this call's decay;
        of a tuple, its first tensor (fla's ShortConvolution returns (y, cache))."""
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            output = output[0]
        if (
            isinstance(output, Tensor)
            and output.dim() >= 2
            and not self._measured
            and torch.is_grad_enabled()
            and self._ctx.due()
        ):
            self._inner = output[:PROBED].detach()

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._inner = None
        if not self.active() or not self.enabled:
            return None
        x, where = _first_tensor(args, kwargs)
        if x is None or not x.is_floating_point() or x.dim() < 2:
            return None
        try:
            new_x = probe_input(x, self._on_grad)
            if isinstance(where, int):
                return (*args[:where], new_x, *args[where + 1 :]), kwargs
            return args, {**kwargs, where: new_x}
        except Exception as exc:  # noqa: BLE001 - never break the forward pass
            self.fail("profile", exc)
            return None

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._measured or not self.on("replay") or not (torch.is_grad_enabled() and self._ctx.due()):
            return
        if not outside_backward():  # a checkpointed forward recomputed during backward
            return
        x, _ = _first_tensor(args, kwargs)
        if x is None or x.dim() < 2:
            return
        try:
            batch = int(x.shape[0])
            probed = min(batch, PROBED)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                cut = (module, _rows(args, batch, probed), _rows(kwargs, batch, probed), _rows(output, batch, probed))
                inner, self._inner = self._inner, None
                got = self._decay(*cut) if not self._undo else self._decay(*cut, inner=_matching(inner, x, probed))
                if got is None:
                    return
                measured = _factored(*got, probed) if isinstance(got, tuple) else _plain(got, probed)
                if measured is None:
                    return  # one step per call: a loop, not a scan (see gradwatch_torch._loops)
                gains, top = measured
            self._prop = (("l0",), gains[None], top[None])
            self._measured = True
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    def _on_grad(self, g: Tensor) -> None:
        if not self.on("profile"):
            return
        try:
            with torch.no_grad():
                sq = timestep_sq_norms(g if g.dim() == 3 else g.reshape(g.shape[0], g.shape[1], -1), True)
                self._sq = add_profiles(self._sq, sq)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("profile", exc)

    def take_temporal(self) -> Tensor | None:
        sq, self._sq = self._sq, None
        self._measured = False  # the next profiled step measures again (the result waits in _prop)
        self.rearm()
        return sq if self.on("profile") else None

    def take_propagation(self) -> tuple[tuple[str, ...], Tensor, Tensor] | None:  # type: ignore[override]
        """(("l0",), gains (1, T), max_gains (1, T)) measured this step, or None."""
        got, self._prop = self._prop, None
        self._measured = False
        return got if self.on("replay") else None

    def close(self) -> None:
        super().close()
        self._sq, self._prop, self._inner = None, None, None
        for undo in self._undo:
            undo()
        self._undo = []


def _matching(inner: Tensor | None, x: Tensor, probed: int) -> Tensor | None:
    """A captured output that lines up with the layer's input rows and steps, else None
    (the decay then recomputes from the input: mamba-ssm's fused path never calls x_proj)."""
    return inner if inner is not None and inner.shape[0] == probed and inner.shape[1:-1] == x.shape[1:-1] else None


#: The RMS over the state sums exp(2 log a - 2 max) over every entry: computed as
#: 2^(x * _TWO_LOG2E) with the exponent floored at _FLOOR. Every term is at most 1 (the
#: largest is 2^0), so one below 2^-115 (2.4e-35) changes the sum by nothing float32 or the
#: 1e-4 contract can see. Measured on this CPU build (float32, 2.1M entries: a Mamba
#: state of 8 rows x 128 steps x 128 x 16): torch.exp 3.6-6 ms, torch.exp2 0.7 ms, and an
#: exponent below the subnormal range makes either 10x slower: most of the propagation's
#: cost at batch 16, before.
_TWO_LOG2E = 2.0 / math.log(2.0)
_FLOOR = -115.0
_BLOCK = 1 << 18  # numbers per block of the factored RMS on the CPU


def _reverse_cumsum(x: Tensor) -> Tensor:
    """(P, T, ...) -> (T - 1, P, ...): row j - 1 = the sum of the last j entries along T
    (j = 1 .. T - 1; row j = 0, the identity, is left to :func:`_with_identity`)."""
    steps = int(x.shape[1])
    back = torch.cumsum(torch.flip(x, (1,)), 1)  # along T with P outermost: fast on CPU
    return back[:, : steps - 1].transpose(0, 1)


def _with_identity(log_rms: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
    """Prepend j = 0 (no step back: the identity, both logs 0) to (T - 1, P) logs."""
    zero = top.new_zeros(1, int(top.shape[1]))
    return torch.cat([zero, log_rms], 0), torch.cat([zero, top], 0)


def _plain(log_a: Tensor, probed: int) -> tuple[Tensor, Tensor] | None:
    """log a (P, T, ...) -> (gains, max_gains): the rule of
    :func:`gradwatch.through_time.diagonal_logs`, with the cumulative sum taken along T
    with the sequences outermost (torch's CPU cumsum along a leading axis is 2-5x slower)."""
    steps = int(log_a.shape[1])
    if steps < 2:
        return None
    wide = torch.float64 if log_a.dtype == torch.float64 else torch.float32
    sums = _reverse_cumsum(log_a[:probed].to(wide).reshape(min(probed, log_a.shape[0]), steps, -1))  # (T-1, P, S)
    top = sums.amax(2)  # (T-1, P)
    shift = top.nan_to_num(nan=0.0, neginf=0.0)  # a reset sequence (all -inf) is shifted by 0
    z = (sums - shift.unsqueeze(-1)).mul_(_TWO_LOG2E).clamp_(min=_FLOOR).exp2_().sum(-1)
    log_rms = torch.log(z).sub_(math.log(sums.shape[2])).mul_(0.5).add_(shift)
    log_rms, top = _with_identity(log_rms.masked_fill_(top == -math.inf, -math.inf), top)
    return aggregate(log_rms, top, TORCH_TENSORS)


def _factored(scale: Tensor, rate: Tensor, probed: int) -> tuple[Tensor, Tensor] | None:
    """log a_t[e, n] = scale_t[e] * rate[e, n] (Mamba: Δ_t and A): the sums over j steps
    back are (sum of the last j scales) * rate, so the reverse cumulative sum runs over
    (T, P, E) only and the largest entry is the scale sum times the largest (or, for a
    negative scale sum, the smallest) rate of each row: exact, N times less work."""
    steps = int(scale.shape[1])
    if steps < 2:
        return None
    wide = torch.float64 if scale.dtype == torch.float64 else torch.float32
    sums = _reverse_cumsum(scale[:probed].to(wide))  # (T-1, P, E)
    rate = rate.to(wide)
    top = torch.where(sums >= 0, sums * rate.amax(1), sums * rate.amin(1)).amax(2)
    steps_, seqs = int(sums.shape[0]), int(sums.shape[1])
    # the RMS over (E, N): 2^((2 log a - 2 top) log2 e) summed in place, a block of steps at a
    # time on the CPU (a block of 2^18 numbers stays in cache: 3-4x faster than one pass
    # over a Mamba state of 8 x 128 x 128 x 16), all at once on an accelerator (one
    # broadcast product, then in place: ``addcmul`` in one pass measured 2x slower)
    rate2, top2 = rate * _TWO_LOG2E, (top * _TWO_LOG2E).unsqueeze(-1)
    block = steps_ if sums.device.type != "cpu" else max(1, _BLOCK // max(seqs * rate.numel(), 1))
    z = torch.empty(steps_, seqs, dtype=sums.dtype, device=sums.device)
    buf = torch.empty(min(block, steps_), seqs, *rate.shape, dtype=sums.dtype, device=sums.device)
    for t in range(0, steps_, block):
        n = min(block, steps_ - t)
        part = torch.mul(sums[t : t + n].unsqueeze(-1), rate2, out=buf[:n]).view(n, seqs, -1)
        torch.sum(part.sub_(top2[t : t + n]).clamp_(min=_FLOOR).exp2_(), -1, out=z[t : t + n])
    log_rms = top + 0.5 * (torch.log(z) - math.log(rate.numel()))
    return aggregate(*_with_identity(log_rms, top), TORCH_TENSORS)


# -- built-in decays (module, args, kwargs, output) -> log a (B, T, ...) -------------------
def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Tensor:
    return args[i] if len(args) > i else kwargs[name]


def _rows_of(linear: nn.Linear, x: Tensor, part: int, parts: int) -> Tensor:
    """``linear(x).chunk(parts, -1)[part]`` computing only that part of the product."""
    size = linear.weight.shape[0] // parts
    rows = slice(part * size, (part + 1) * size)
    bias = linear.bias[rows] if linear.bias is not None else None
    return F.linear(x, linear.weight[rows], bias)


@capturing("to_hidden_and_gate")
def mingru_decay(module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None) -> Tensor:
    """minGRU: log(1 - z_t) = -softplus(gate); (B, T, D)."""
    if inner is not None:
        return F.softplus(inner[..., inner.shape[-1] // 2 :].float()).neg_()
    x = _arg(args, kwargs, 0, "x")
    return F.softplus(_rows_of(module.to_hidden_and_gate, x, 1, 2).float()).neg_()


@capturing("to_hidden_and_f_i_gate")
def minlstm_decay(module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None) -> Tensor:
    """minLSTM: log f' = -softplus(softplus(-f) - softplus(-i)); (B, T, D)."""
    if inner is not None:
        d = inner.shape[-1] // 3
        f, i = inner[..., d : 2 * d].float(), inner[..., 2 * d :].float()
    else:
        x = _arg(args, kwargs, 0, "x")
        lin = module.to_hidden_and_f_i_gate
        f, i = _rows_of(lin, x, 1, 3).float(), _rows_of(lin, x, 2, 3).float()
    return -F.softplus(F.softplus(-f) - F.softplus(-i))


@capturing("x_proj")
def mamba_decay(
    module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mamba (S6): log a_t = Δ_t A per (channel, state), as the pair (Δ (B, T, ED), A (ED,
    N)); Δ from x_proj's output when the forward called it (mambapy), else from the
    mixer's input (mamba-ssm's fused path hides x_proj)."""
    dt_rank = module.dt_proj.weight.shape[1]
    if inner is not None:
        delta = inner[..., :dt_rank]
    else:
        u = _arg(args, kwargs, 0, "x") if args or "x" in kwargs else kwargs["hidden_states"]
        steps = int(u.shape[1])
        x = _rows_of(module.in_proj, u, 0, 2)  # the x half of in_proj (z is not needed)
        x = module.conv1d(x.transpose(1, 2))[:, :, :steps].transpose(1, 2)
        delta = module.x_proj(F.silu(x))[..., :dt_rank]
    norm = getattr(module, "dt_layernorm", None)
    if norm is not None:
        delta = norm(delta)
    delta = F.softplus(F.linear(delta.float(), module.dt_proj.weight.float(), module.dt_proj.bias.float()))
    return delta, -torch.exp(module.A_log.float())  # log a_t = Δ_t[e] A[e, n], factored


@capturing("in_proj")
def mamba2_decay(module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None) -> Tensor | None:
    """Mamba-2 (SSD): one scalar A per head, so log a_t = Δ_t A is one number per head for
    the head's whole (P, N) state, read from the last ``nheads`` columns of ``in_proj``
    (the split is [z, x, B, C, dt] in mambapy and mamba-ssm alike): Δ = softplus(dt +
    dt_bias), clamped to ``dt_limit`` when one is set; a new document (``seq_idx``
    changing) resets the state; (B, T, H). Every head's entries decay alike, so the RMS
    and the largest entry over heads are those over the whole state."""
    u = _arg(args, kwargs, 0, "u") if args or "u" in kwargs else kwargs["hidden_states"]
    if u.dim() != 3:  # mamba-ssm's varlen call: (B * L, D) with seqlen, not read here
        return None
    heads = int(module.A_log.shape[0])
    if inner is not None:
        dt = inner[..., -heads:].float() + module.dt_bias.float()
    else:
        w, b = module.in_proj.weight, module.in_proj.bias
        dt = F.linear(u, w[-heads:], None if b is None else b[-heads:]).float() + module.dt_bias.float()
    dt = F.softplus(dt)
    limit = getattr(module, "dt_limit", None) or getattr(getattr(module, "config", None), "dt_limit", None)
    if limit is not None and tuple(limit) != (0.0, math.inf):
        dt = dt.clamp(float(limit[0]), float(limit[1]))
    log_a = dt * -torch.exp(module.A_log.float().reshape(heads, -1)[:, 0])
    seq_idx = kwargs.get("seq_idx", args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None)
    if isinstance(seq_idx, Tensor) and seq_idx.shape == log_a.shape[:2]:
        new_doc = torch.cat([torch.zeros_like(seq_idx[:, :1], dtype=torch.bool), seq_idx[:, 1:] != seq_idx[:, :-1]], 1)
        log_a = log_a.masked_fill(new_doc[..., None], -math.inf)
    return log_a


def stabilised_log_forget(log_f: Tensor, i: Tensor, m0: Tensor | None, dim: int) -> Tensor:
    """xLSTM's stabilised forget gate in log, log f'_t = log f_t + m_{t-1} - m_t, along
    ``dim``, for the mLSTM and the sLSTM: the stabiliser m_t = max(i_t, log f_t + m_{t-1})
    in closed form, m_t = F_t + max(m_0, max_{s<=t} (i_s - F_s)) with F the cumulative sum
    of log f: parallel over time. ``m0`` (the shape of one step of ``log_f``) is the
    initial stabiliser, None for -inf (the first step's m is i_1)."""
    cum = torch.cumsum(log_f, dim)
    best = torch.cummax(i - cum, dim).values
    first = torch.full_like(cum.narrow(dim, 0, 1), -math.inf) if m0 is None else m0
    if m0 is not None:
        best = torch.maximum(best, m0)
    m = cum + best
    return log_f + torch.cat([first, m.narrow(dim, 0, m.shape[dim] - 1)], dim) - m


def mlstm_decay(module: Any, args: tuple, kwargs: dict, output: Any) -> Tensor:
    """xLSTM mLSTM cell: stabilised decay per head, exp(log sigmoid(f) + m_{t-1} - m_t);
    (B, T, NH)."""
    q, k, v = _arg(args, kwargs, 0, "q"), _arg(args, kwargs, 1, "k"), _arg(args, kwargs, 2, "v")
    qkv = torch.cat([q, k, v], dim=-1)
    log_f = F.logsigmoid(module.fgate(qkv).float())  # (B, T, NH)
    i = module.igate(qkv).float()
    return stabilised_log_forget(log_f, i, torch.zeros_like(log_f[:, :1]), 1)  # m_0 = 0


def rglru_decay(module: Any, args: tuple, kwargs: dict, output: Any) -> Tensor:
    """RG-LRU (recurrentgemma): log a_t = -8 r_t softplus(Λ), r_t = sigmoid(a_gate(x_t));
    a document boundary (``segment_pos == 0``) resets the state: a_t = 0 (log -inf); (B, T, D)."""
    x = _arg(args, kwargs, 0, "x")
    pos = _arg(args, kwargs, 1, "segment_pos")
    log_a = -8.0 * torch.sigmoid(module.a_gate(x).float()) * F.softplus(module.a_param.float())
    return log_a.masked_fill((pos == 0)[..., None], -math.inf)


#: xlstm's vanilla sLSTM cell: a dense step, probed by :class:`gradwatch_torch._slstm.SLSTMProbe`.
SLSTM = Recurrence("xlstm.blocks.slstm.cell.sLSTMCell_vanilla", step=True, kind="slstm", gate="forget")

#: Layers gradwatch knows by name (no import of their package).
BUILTIN: list[Recurrence] = [
    Recurrence("minGRU_pytorch.minGRU.minGRU", decay=mingru_decay, kind="mingru", gate="update"),
    Recurrence("minGRU_pytorch.minLSTM.minLSTM", decay=minlstm_decay, kind="minlstm", gate="forget"),
    Recurrence("mambapy.mamba.MambaBlock", decay=mamba_decay, kind="mamba", gate="delta"),
    Recurrence("mamba_ssm.modules.mamba_simple.Mamba", decay=mamba_decay, kind="mamba", gate="delta"),
    Recurrence("mambapy.mamba2.Mamba2Block", decay=mamba2_decay, kind="mamba", gate="delta"),
    Recurrence("mamba_ssm.modules.mamba2.Mamba2", decay=mamba2_decay, kind="mamba", gate="delta"),
    Recurrence("mamba_ssm.modules.mamba2_simple.Mamba2Simple", decay=mamba2_decay, kind="mamba", gate="delta"),
    Recurrence("xlstm.blocks.mlstm.cell.mLSTMCell", decay=mlstm_decay, kind="mlstm", gate="forget"),
    Recurrence("recurrentgemma.torch.layers.RGLRU", decay=rglru_decay, kind="rglru", gate="recurrence"),
    SLSTM,
    *FLA,
]
