"""Any module called in a loop, ``h = cell(x_t, h)``: propagation through the cell's own
autograd.

*Which modules.* A module declared with ``register_recurrence(T, step=True)``, and any
module of the user's own classes (not ``torch.nn``'s) that is seen, within one profiled
step, taking as an argument the very object its previous call returned (or one element
of it: ``out, h = cell(x, h)``; or a tuple of its elements: ``h, c = cell(x, (h, c))``).
Like :mod:`gradwatch_torch._cells`, a call whose state is anything else (None, a fresh
tensor, the previous output after any operation) starts a new chain: gradwatch cannot see
what the user's code did in between. An undeclared module that is not seen in a loop on
its first profiled step is never looked at again (its hooks return at once).

*What is recorded.* On profiled steps, for each call in a chain: the probed rows (the
first ``min(B, 8)``) of every batch-shaped argument and of the state it returned, as
detached clones. Nothing else (no graph is kept).

*The measurement.* At the optimizer step the longest chain of the step is replayed: for
each call t, the state Jacobian J_t = d s_t / d s_{t-1} of every probed sequence, by S
vector-Jacobian products of the cell's own forward (every call's rows stacked into one
batch, one batched ``autograd.grad`` with ``is_grads_batched``; the rows of a batch are
independent, so one cotangent e_a on every row gives row p's Jacobian row a), then the
products J_T ... J_{T-j+1}, carried whole with
their scale kept in log (exact: the largest singular value and the RMS gain of each
product, for a state of up to ``LOOP_EXACT_DIM`` numbers; a larger state is not measured
and says so: ``recurrences == {}``). The replayed states are checked against the ones the
forward returned (a cell with dropout in training mode, or one that changes its weights
during forward, fails the check and its propagation is switched off with one ERROR line).

*Cost.* One replay is one forward of the cell on the stacked (T-1) x P rows and S
batched backward passes, then T small (P, S, S) products and one batched eigenvalue call
for the largest singular values. Measured (``benchmarks/modern_bench.py``, 1 thread, a
loaded 2-core machine): a tanh cell T = 100, B = 32: S = 8, 15 ms = 0.6 of a training
step; S = 32, 87 ms = 2.9 training steps (the eigenvalues dominate). It runs on every
n-th profiled step, n from :func:`gradwatch.through_time.plan.replay_every` (the same 5%
share as the other replays), from the chain's length and the cell's size only; the
probed rows are copied only on the steps whose replay is due. A state above
``LOOP_EXACT_DIM`` is not replayed: a GRU-like cell T = 50, B = 32 would cost about 0.9 s
= 19 training steps a replay at S = 128 and 5-7 s = 50-73 steps at S = 256
(``benchmarks/modern_cost.py``); with the defaults such a cell's probe costs 1.010x and
1.002x of the watched step (on/off, interleaved).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.through_time.families import GATES, Recurrence
from gradwatch.through_time.fit import aggregate
from gradwatch.through_time.plan import SMALL_MATMUL_PENALTY, replay_every
from gradwatch_torch._probing import ProbeContext, outside_backward, tolerance
from gradwatch_torch._recurrent import MAX_CELL_REPLAY, Probe
from gradwatch_torch._tensor_ops import TORCH_TENSORS
from gradwatch_torch._trajectory import PROBED

__all__ = ["LOOP_EXACT_DIM", "LoopProbe", "candidate", "log_products"]

logger = logging.getLogger("gradwatch")

#: Largest state (numbers per sequence) carried whole; above, propagation is not measured
#: (one replay would cost 19 training steps at 128 numbers, 50-73 at 256: issue 17's section of
#: benchmarks/RESULTS.md), and the cell's hooks return at once after its first profiled step.
LOOP_EXACT_DIM = 64

_Where = tuple[Any, Any]  # (argument position or keyword, element of the output or None)


def candidate(m: nn.Module) -> bool:
    """A module of the user's own classes (not torch's own layers or containers)."""
    mod = type(m).__module__ or ""
    return not (mod.startswith("torch.") or mod == "torch") and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class _Rows:
    """A recorded argument's probed rows (what the replay may stack across calls)."""

    __slots__ = ("t",)

    def __init__(self, t: Tensor) -> None:
        self.t = t


def _clone_rows(value: Any, batch: int, probed: int, mark: bool = False) -> Any:
    """Detached copies of the probed rows of every batch-shaped tensor in ``value``
    (wrapped in :class:`_Rows` with ``mark``); other tensors detached."""
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            rows = value[:probed].detach().clone()
            return _Rows(rows) if mark else rows
        return value.detach()
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_clone_rows(v, batch, probed, mark) for v in value)
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, _Rows):
        return value.t
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_unwrap(v) for v in value)
    return value


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _batch(args: tuple, kwargs: dict) -> int | None:
    for v in [*args, *kwargs.values()]:
        ts = _tensors(v)
        if ts and ts[0].dim() >= 1:
            return int(ts[0].shape[0])
    return None


class _Call:
    __slots__ = ("args", "kwargs", "out", "where")

    def __init__(self, args: tuple, kwargs: dict, where: _Where | None) -> None:
        self.args, self.kwargs, self.where = args, kwargs, where
        self.out: Any = None  # the probed rows of the state this call returned


def _merge(values: list[Any]) -> Any:
    """The calls' recorded arguments (or states) as one batch: probed rows (:class:`_Rows`,
    or plain tensors with ``rows``) concatenated; anything else must be the same in every
    call."""
    first = values[0]
    if isinstance(first, _Rows):
        if not all(isinstance(v, _Rows) and v.t.shape == first.t.shape for v in values):
            raise ValueError("an argument changes shape from call to call")
        return _Rows(torch.cat([v.t for v in values], 0))
    if isinstance(first, Tensor):
        if all(v is first or (isinstance(v, Tensor) and v.shape == first.shape and torch.equal(v, first)) for v in values):
            return first
        raise ValueError("an argument changes from call to call")
    if isinstance(first, dict):
        return {k: _merge([v[k] for v in values]) for k in first}
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        if not all(isinstance(v, (tuple, list)) and len(v) == len(first) for v in values):
            raise ValueError("an argument changes from call to call")
        return type(first)(_merge([v[i] for v in values]) for i in range(len(first)))
    if all(v is first or v == first for v in values):
        return first
    raise ValueError("an argument changes from call to call")


def _stack_states(states: list[Any]) -> Any:
    """States (tensors or tuples of tensors, the probed rows) concatenated along rows."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states, 0)
    return type(first)(_stack_states([s[i] for s in states]) for i in range(len(first)))


def _select(output: Any, sel: Any) -> Any:
    return output if sel is None else output[sel]


def _flat(state: Any) -> Tensor:
    ts = _tensors(state)
    return torch.cat([t.reshape(t.shape[0], -1) for t in ts], dim=1)


def _unflat(flat: Tensor, like: Any) -> Any:
    ts = _tensors(like)
    parts, start = [], 0
    for t in ts:
        n = t[0].numel() if t.dim() > 1 else 1
        parts.append(flat[:, start : start + n].reshape(t.shape))
        start += n
    if isinstance(like, Tensor):
        return parts[0]
    return type(like)(parts)


class LoopProbe(Probe):
    """Probe of a module called in a loop (see the module docstring)."""

    def __init__(self, name: str, module: nn.Module, ctx: ProbeContext, spec: Recurrence | None) -> None:
        super().__init__(name, module, ctx)
        self.kind = spec.kind if spec is not None else "cell"
        self.gates = ("",)
        self.gate_name = spec.gate if spec is not None else GATES["cell"]
        self._declared = spec is not None
        self._seen_loop = False
        self._dead = False  # undeclared, and not a loop on its first profiled step
        self._calls_this_step = 0
        self._chain: list[_Call] = []
        self._best: list[_Call] = []
        self._prev: _Call | None = None
        self._last_out: Any = None
        self._pending: _Call | None = None
        self._tol = 0.0
        self._batch = 1
        self._plan: tuple[int, int] | None = None  # (chain length, state size) last measured
        self._recording = True
        self._prop: tuple[tuple[str, ...], Tensor, Tensor] | None = None

    @property
    def speculative(self) -> bool:
        """Undeclared and not (yet) seen in a loop: not known to be a recurrent layer."""
        return not self._declared and not self._seen_loop

    # -- recording ------------------------------------------------------------------------
    def _link(self, args: tuple, kwargs: dict) -> _Where | None:
        last = self._last_out
        if last is None:
            return None
        elems = list(last) if isinstance(last, (tuple, list)) else []
        for where, arg in [*enumerate(args), *kwargs.items()]:
            if arg is last:
                return (where, None)
            for k, e in enumerate(elems):
                if arg is e and _tensors(e):
                    return (where, k)
            if isinstance(arg, (tuple, list)) and elems and len(arg) == len(elems) and all(a is b for a, b in zip(arg, elems)):
                return (where, None)
        return None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._dead or not self.on("replay") or not (torch.is_grad_enabled() and self._ctx.due()) or not outside_backward():
            return
        try:
            self._calls_this_step += 1
            if self._calls_this_step == 1:  # record this step? (copies cost too: only when a replay follows)
                module_ = self._module()
                self._recording = self._plan is None or module_ is None or self._due(module_, *self._plan)
            if not self._recording:
                return
            where = self._link(args, kwargs)
            batch = _batch(args, kwargs)
            if batch is None:
                return
            probed = min(batch, PROBED)
            self._batch = batch
            call = _Call(_clone_rows(args, batch, probed, True), {k: _clone_rows(v, batch, probed, True) for k, v in kwargs.items()}, where)
            if where is None:
                if len(self._chain) > len(self._best):
                    self._best = self._chain
                self._chain = []
            elif len(self._chain) < MAX_CELL_REPLAY:
                self._seen_loop = True
                if not self._chain and self._prev is not None:
                    self._chain = [self._prev]
                self._chain.append(call)
            self._prev = call
            self._pending = call
        except Exception as exc:  # noqa: BLE001 - never break the forward pass
            self.fail("replay", exc)
        return

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._pending = self._pending, None
        if call is None:
            return
        try:
            self._last_out = output
            batch = _batch(args, kwargs)
            probed = min(batch or 1, PROBED)
            call.out = _clone_rows(output, batch, probed) if batch is not None else None
            ts = _tensors(output)
            if ts:
                self._tol = max(self._tol, tolerance(ts[0].dtype, ts[0].device.type))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    # -- the replay ----------------------------------------------------------------------
    def _end_step(self) -> list[_Call]:
        chain = self._chain if len(self._chain) > len(self._best) else self._best
        if self._calls_this_step and not self._seen_loop and not self._declared:
            self._dead = True  # not a loop cell: never looked at again
        self._chain, self._best, self._prev, self._last_out, self._pending = [], [], None, None, None
        self._calls_this_step = 0
        return chain

    def _due(self, module: nn.Module, steps: int, state_dim: int) -> bool:
        """Replay on this profiled step? One replay costs about ``state_dim`` backward passes
        (twice a forward) of the cell on the probed rows per call, against a training step
        of 6 x parameters x tokens (:func:`~gradwatch.through_time.plan.replay_every`)."""
        if state_dim > LOOP_EXACT_DIM:
            return False
        if self._ctx.step() == 1:
            return True
        params = max(sum(p.numel() for p in module.parameters()), 1)
        probed = min(self._batch, PROBED)
        # S cotangents through the cell on (T x P) rows, and T products and one SVD of (P, S, S)
        flops = steps * probed * (6.0 * params * state_dim + SMALL_MATMUL_PENALTY * 12.0 * state_dim**3)
        step_flops = 6.0 * max(self._ctx.model_params, 1) * self._batch * steps
        n = replay_every(flops, step_flops)
        return (self._ctx.step() // max(self._ctx.every, 1)) % n == 0

    def _replay(self) -> None:
        chain = self._end_step()
        module = self._module()
        if module is None or len(chain) < 2 or not self.on("replay") or chain[1].where is None:
            return
        tol, self._tol = self._tol, 0.0
        where, sel = chain[1].where
        state0 = _select(chain[0].out, sel)
        dim = int(_flat(state0).shape[1])
        self._plan = (len(chain), dim)
        if dim > LOOP_EXACT_DIM:  # never measured: its hooks return at once from now on
            self._dead = True
            logger.info("gradwatch: loop cell %r carries %d numbers of state (> %d); its propagation is not measured.", self.name, dim, LOOP_EXACT_DIM)
            return
        try:
            with torch.enable_grad(), torch.autocast(_flat(state0).device.type, enabled=False):
                logs_rms, logs_top = self._products(module, chain, where, sel, tol)
            if logs_rms is None:
                return
            gains, top = aggregate(logs_rms, logs_top, TORCH_TENSORS)
            self._prop = (("l0",), gains[None], top[None])
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    def _jacobian(self, module: nn.Module, call: _Call, where: Any, sel: Any, state_in: Any) -> tuple[Tensor, Tensor]:
        """(J (P, S, S) of this call, the replayed state (P, S))."""
        flat_in = _flat(state_in).detach().float().requires_grad_()
        like = state_in

        def run(flat: Tensor) -> Tensor:
            st = _unflat(flat.to(_tensors(like)[0].dtype), like)
            args, kwargs = list(_unwrap(call.args)), dict(_unwrap(call.kwargs))
            if isinstance(where, int):
                args[where] = st
            else:
                kwargs[where] = st
            return _flat(_select(module(*args, **kwargs), sel)).float()

        out = run(flat_in)
        p, s = out.shape
        eye = torch.eye(s, dtype=out.dtype, device=out.device).unsqueeze(1).expand(s, p, s)
        try:
            (rows,) = torch.autograd.grad(out, flat_in, eye, is_grads_batched=True)
        except RuntimeError:  # an operation without a batching rule: one product at a time
            rows = torch.stack([torch.autograd.grad(out, flat_in, eye[a], retain_graph=True)[0] for a in range(s)])
        return rows.permute(1, 0, 2).detach(), out.detach()

    def _products(self, module: nn.Module, chain: list[_Call], where: Any, sel: Any, tol: float) -> tuple[Any, Any]:
        """Per-sequence logs (T, P) of the RMS gain and the largest singular value of
        d s_T / d s_{T-j}, j = 0 .. T-1 (s_t: the state call t returned).

        Every call's Jacobian at once: the calls' probed rows are stacked into one batch
        ((T-1) x P rows; rows are independent), so one forward and one batched backward
        of S cotangents give them all. A cell whose other arguments change from call to
        call in a way that cannot be stacked is replayed call by call."""
        jacs: list[Tensor] = []
        worst = 0.0
        with _no_hooks(self):
            try:
                merged = _Call(*(_merge([c.args for c in chain[1:]]), _merge([c.kwargs for c in chain[1:]])), None)
                state_in = _stack_states([_select(c.out, sel) for c in chain[:-1]])
                pairs = [(merged, state_in, _stack_states([_select(c.out, sel) for c in chain[1:]]))]
            except (ValueError, TypeError, RuntimeError):
                pairs = [(chain[t], _select(chain[t - 1].out, sel), _select(chain[t].out, sel)) for t in range(1, len(chain))]
            for call, state_in, want_state in pairs:
                jac, out = self._jacobian(module, call, where, sel, state_in)
                want = _flat(want_state).float()
                scale = float(want.abs().max()) or 1.0
                worst = max(worst, float((out - want).abs().max()) / scale)
                jacs.append(jac)
        jac_all = torch.cat(jacs, 0)
        rows = int(_flat(_select(chain[0].out, sel)).shape[0])
        jacs = list(jac_all.reshape(len(chain) - 1, rows, *jac_all.shape[1:]).unbind(0))
        if not worst <= max(tol, 1e-3):
            self.fail(
                "replay",
                f"the replayed states differ from the cell's own output by {worst:.3g} of its largest value; is there "
                "dropout inside the cell in training mode, or randomness, or are its weights changed inside forward?",
            )
            return None, None
        log_fro, log_top = log_products(jacs)
        rms = log_fro - 0.5 * math.log(int(jacs[0].shape[1]))
        rms[0] = 0.0
        return rms, log_top

    # -- results ---------------------------------------------------------------------------
    def take_temporal(self) -> Tensor | None:
        """Loop cells report propagation only (no per-timestep input profile)."""
        self._replay()
        self.rearm()
        return None

    def take_propagation(self) -> tuple[tuple[str, ...], Tensor, Tensor] | None:  # type: ignore[override]
        self._replay()
        got, self._prop = self._prop, None
        return got if self.on("replay") else None

    def close(self) -> None:
        super().close()
        self._chain, self._best, self._prev, self._last_out, self._prop = [], [], None, None, None


def log_products(jacs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row logs (T, R) of the Frobenius norm and of the largest singular value of
    J_T ... J_{T-j+1}, j = 0 .. T-1, from ``jacs`` = [J_2, ..., J_T], each (R, S, S) (row 0:
    the identity, both logs 0). The products are carried whole, kept at Frobenius norm 1
    with their scale in log (no overflow over any number of steps); the largest singular
    value is the square root of the top eigenvalue of M M^T (faster than an SVD), in float64."""
    p, s = jacs[0].shape[0], jacs[0].shape[1]
    prod = torch.eye(s, dtype=jacs[0].dtype, device=jacs[0].device).expand(p, s, s).clone()
    log_scale = torch.zeros(p, dtype=torch.float64, device=prod.device)
    scales, prods = [log_scale], [prod]
    for jac in reversed(jacs):
        prod = prod @ jac
        fro = torch.linalg.matrix_norm(prod).double()
        log_scale = log_scale + torch.log(fro)
        prod = prod / torch.where(fro > 0, fro, 1.0).to(prod.dtype)[:, None, None]
        scales.append(log_scale)
        prods.append(prod)
    stacked = torch.stack(prods)  # (T, R, S, S)
    try:  # in float64: float32 LAPACK eigh fails to converge on some of these (an sLSTM's blocks)
        top = torch.linalg.eigvalsh((stacked @ stacked.mT).double())[..., -1].clamp_min(0.0).sqrt()
    except RuntimeError:  # (torch.linalg.LinAlgError) the SVD, slower, converges where eigh does not
        top = torch.linalg.svdvals(stacked.double())[..., 0]
    scale = torch.stack(scales)
    return scale, scale + torch.log(top)


class _no_hooks:
    """While replaying, the probe's own hooks must not record the replay's calls."""

    def __init__(self, probe: LoopProbe) -> None:
        self.probe = probe

    def __enter__(self) -> None:
        self.was = self.probe._dead
        self.probe._dead = True

    def __exit__(self, *exc: object) -> None:
        self.probe._dead = self.was
