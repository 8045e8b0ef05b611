"""xLSTM's sLSTM (``xlstm``'s vanilla backend): propagation through the package's own
step, exact.

The sLSTM carries s_t = (y_t, c_t, n_t, m_t) per unit (m the stabiliser) through a Python
loop inside the cell (``slstm_forward``), not a module called once per step, so the
loop-cell probe never sees it. Its gates read y_{t-1} through the recurrent kernel R, so
d s_t / d s_{t-1} is dense, not a diagonal decay; but R is block-diagonal over heads and
the pointwise step is per unit, so the Jacobian is block-diagonal with one (4 dh, 4 dh)
block per head (dh = head_dim), and so is every product of them: the largest singular
value of d s_T / d s_{T-j} is the largest over heads, its squared Frobenius norm the sum
over heads.

On a profiled step whose replay is due (the loop cells' rule and budget,
:class:`~gradwatch_torch._loops.LoopProbe`), the forward hook replays the cell on the
probed rows (the first ``min(B, 8)``) with the package's own ``slstm_forward`` (checked
against the states the cell returned), then takes every step's Jacobian at once: 4 dh
vector-Jacobian products of the package's own ``slstm_forward_step`` over the stacked
(T - 1) x P rows, every head at once; then the products, carried whole with their scale
in log (:func:`~gradwatch_torch._loops.log_products`). Exact for 4 dh <= ``LOOP_EXACT_DIM``
(dh <= 16).

Larger heads (the usual sizes: 4 dh = 128 for a 128-wide layer of 4 heads) would cost
(4 dh)^3 per head and step; for them gradwatch measures, on every profiled step, the
**forget path**: the cell state's own recurrence c_t = f'_t c_{t-1} + ..., whose product
over j steps is diag(prod f'_k) with the stabilised forget gate
f'_t = min(exp(log sigmoid(f~_t) + m_{t-1} - m_t), 1), exactly the diagonal recurrence the
mLSTM is measured on. Its gates come at once for all t, parallel over time, from what the
forward computed: f~_t and i~_t from the cell's input and its output y_{t-1} through R
(one batched matmul), the stabiliser m_t = max(i~_t, log sigmoid(f~_t) + m_{t-1}) in
closed form with a cumulative max. The sensitivity profile is the gradient of the cell's
input, as for the diagonal layers. The CUDA backend (``sLSTMCell_cuda``) is a fused kernel
with another layout and is not probed.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.through_time.families import Recurrence
from gradwatch.through_time.fit import aggregate
from gradwatch.through_time.plan import SMALL_MATMUL_PENALTY, replay_every
from gradwatch_torch._loops import LOOP_EXACT_DIM, log_products
from gradwatch_torch._modern import SLSTM, DiagonalProbe, _plain, stabilised_log_forget
from gradwatch_torch._probing import ProbeContext, outside_backward, tolerance
from gradwatch_torch._tensor_ops import TORCH_TENSORS
from gradwatch_torch._trajectory import PROBED

__all__ = ["SLSTM", "SLSTMProbe", "forget_path"]


class SLSTMProbe(DiagonalProbe):
    """Probe of xlstm's vanilla sLSTM cell (see the module docstring)."""

    def __init__(self, name: str, module: nn.Module, ctx: ProbeContext, spec: Recurrence) -> None:
        super().__init__(name, module, ctx, spec)
        self._batch = 1

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if getattr(module.config, "input_shape", "BSGNH") != "BSGNH":
            return None  # sequence-first input: the sensitivity profile reads (B, T, ...)
        return super().pre_hook(module, args, kwargs)

    def _due(self, module: nn.Module, steps: int, block: int) -> bool:
        """The loop cells' rule: block VJPs through the cell on (T x P) rows, T products and
        eigenvalues of (P x heads) blocks, against a training step of 6 x params x tokens."""
        if block > LOOP_EXACT_DIM:
            return False
        if self._ctx.step() == 1:
            return True
        params = max(sum(p.numel() for p in module.parameters()), 1)
        heads = max(int(module.config.num_heads), 1)
        probed = min(self._batch, PROBED)
        flops = steps * probed * (6.0 * params * block + SMALL_MATMUL_PENALTY * 12.0 * heads * block**3)
        n = replay_every(flops, 6.0 * max(self._ctx.model_params, 1) * self._batch * steps)
        return (self._ctx.step() // max(self._ctx.every, 1)) % n == 0

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._measured or not self.on("replay") or not (torch.is_grad_enabled() and self._ctx.due()):
            return
        if not outside_backward():
            return
        try:
            inp = args[0] if args else kwargs["input"]
            state = args[1] if len(args) > 1 else kwargs.get("state")
            cfg = module.config
            x = module._permute_input(inp)  # (S, B, G * H), the cell's internal layout
            steps, self._batch = int(x.shape[0]), int(x.shape[1])
            block = cfg.num_states * (cfg.hidden_size // cfg.num_heads)
            probed = min(self._batch, PROBED)
            if steps >= 2 and block > LOOP_EXACT_DIM:  # the forget path, on every profiled step
                self._measured = True
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    log_f = forget_path(module, x[:, :probed].detach().float(), state, output, probed)
                got = None if log_f is None else _plain(log_f, probed)
                if got is not None:
                    self._prop = (("l0",), got[0][None], got[1][None])
                return
            if steps < 2 or not self._due(module, steps, block):
                return
            self._measured = True
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                got = self._measure(module, x[:, :probed].detach().float(), state, output, probed)
            if got is not None:
                self._prop = (("l0",), got[0][None], got[1][None])
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    def _measure(
        self, module: nn.Module, x: Tensor, state: Tensor | None, output: Any, probed: int
    ) -> tuple[Tensor, Tensor] | None:
        vanilla = importlib.import_module(type(module).__module__)  # the package's own step functions
        cfg = module.config
        heads, dh, ns = int(cfg.num_heads), cfg.hidden_size // cfg.num_heads, int(cfg.num_states)
        r, b = module._recurrent_kernel.detach().float(), module._bias.detach().float()
        consts = cfg.constants
        s0 = module._get_state(x, None if state is None else state[:, :probed].detach().float())
        with torch.no_grad():
            traj = vanilla.slstm_forward(x, s0, r, b, module.pointwise, constants=consts)[0]  # (NS, S + 1, P, H)
        final = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if isinstance(final, Tensor) and final.dim() == 3:
            want = final[:, :probed].detach().float()
            worst = float((traj[:, -1] - want).abs().max()) / (float(want.abs().max()) or 1.0)
            if not worst <= max(tolerance(final.dtype, final.device.type), 1e-3):
                self.fail(
                    "replay",
                    f"the replayed sLSTM states differ from the cell's own by {worst:.3g} of its largest value",
                )
                return None
        steps = int(x.shape[0])
        rows = (steps - 1) * probed  # calls 2 .. T: from s_1 .. s_{T-1}, every call's rows stacked
        wx = x[1:].reshape(rows, -1)
        s_in = traj[:, 1:steps].reshape(ns, rows, heads, dh).permute(1, 2, 0, 3).reshape(rows, heads, ns * dh)
        s_in = s_in.detach().requires_grad_()

        def step(v: Tensor) -> Tensor:  # (rows, heads, NS * dh) -> the same, one sLSTM step
            s = v.reshape(rows, heads, ns, dh).permute(2, 0, 1, 3).reshape(ns, rows, heads * dh)
            new = vanilla.slstm_forward_step(wx[None], s, r, b, module.pointwise, constants=consts)[0][:, 0]
            return new.reshape(ns, rows, heads, dh).permute(1, 2, 0, 3).reshape(rows, heads, ns * dh)

        out = step(s_in)
        size = ns * dh
        eye = torch.eye(size, dtype=out.dtype, device=out.device)[:, None, None, :].expand(size, rows, heads, size)
        (jac,) = torch.autograd.grad(out, s_in, eye, is_grads_batched=True)  # (size, rows, heads, size): row a
        jac = jac.permute(1, 2, 0, 3).reshape(steps - 1, probed * heads, size, size).detach()
        log_fro, log_top = log_products(list(jac.unbind(0)))  # (T, P * heads) each
        log_fro, log_top = log_fro.reshape(steps, probed, heads), log_top.reshape(steps, probed, heads)
        log_rms = 0.5 * torch.logsumexp(2.0 * log_fro, 2) - 0.5 * math.log(heads * size)
        log_rms[0] = 0.0
        top = log_top.amax(2)
        return aggregate(log_rms, top, TORCH_TENSORS)


def _outputs_internal(module: nn.Module, output: Any) -> Tensor | None:
    """The cell's output y_1 .. y_T back in its internal (S, B, H) layout."""
    y = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(y, Tensor):
        return None
    shape = module.config.output_shape
    if shape == "SBH":
        return y
    if shape == "BSH":
        return y.permute(1, 0, 2)
    if shape == "BNSH":
        return y.permute(2, 0, 1, 3).reshape(y.shape[2], y.shape[0], -1)
    if shape == "SBNH":
        return y.reshape(y.shape[0], y.shape[1], -1)
    return None


def forget_path(module: nn.Module, x: Tensor, state: Tensor | None, output: Any, probed: int) -> Tensor | None:
    """log f'_t (P, T, H) of the probed rows (see the module docstring), from the cell's
    internal input ``x`` (S, P, 4H), its initial ``state`` and its ``output``; None when
    the output is not laid out as the package's vanilla cell lays it out."""
    y = _outputs_internal(module, output)
    if y is None or y.shape[0] != x.shape[0]:
        return None
    cfg = module.config
    steps, heads, hidden = int(x.shape[0]), int(cfg.num_heads), int(cfg.hidden_size)
    dh = hidden // heads
    y = y[:, :probed].float()
    s0 = None if state is None else state[:, :probed].float()
    y0 = torch.zeros_like(y[:1]) if s0 is None else s0[0][None]
    # y_{t-1} for every t at once, per head: (heads, T P, dh) @ (heads, dh, 2 dh), the i and f
    # columns of R only (slstm_forward orders R's columns gate-major within a head)
    prev = torch.cat([y0, y[:-1]], 0).reshape(steps * probed, heads, dh).transpose(0, 1)
    r = module._recurrent_kernel.detach().float().transpose(1, 2)[:, :, : 2 * dh]
    ry = torch.bmm(prev, r).reshape(heads, steps, probed, 2, dh).permute(1, 2, 3, 0, 4).reshape(steps, probed, 2, hidden)
    bias = module._bias.detach().float().reshape(-1, hidden)[:2]
    raw = x.reshape(steps, probed, -1, hidden)[:, :, :2] + ry + bias
    raw = raw.permute(1, 2, 3, 0).contiguous()  # (P, 2, H, T): time innermost (CPU scans 2-5x faster)
    i_raw, log_sig_f = raw[:, 0], torch.nn.functional.logsigmoid(raw[:, 1])
    # a zero state (n == 0) starts with m_1 = i~_1 (the package's n == 0 branch): m_0 = -inf
    m0 = s0[3][..., None] if s0 is not None and bool((s0[2] != 0).any()) else None
    log_f = torch.clamp(stabilised_log_forget(log_sig_f, i_raw, m0, -1), max=0.0)
    log_f[..., 0] = 0.0  # the first step's decay multiplies the initial state, never a product of j <= T - 1
    return log_f.transpose(1, 2)
