"""flash-linear-attention (``fla``): the decays of its gated linear recurrences, exact.

GLA, HGRN and RWKV-6 update their state by a diagonal decay and a rank-one write,

    S_t = diag(a_t) S_{t-1} + k_t v_t^T   (HGRN: h_t = a_t * h_{t-1} + x_t),

so d S_T / d S_{T-j} = diag(prod a_k) and their propagation is that of the other diagonal
recurrences (:mod:`gradwatch_torch._modern`), read from log a_t. fla runs these updates in
Triton kernels that no hook can see into, so the decay is read from what the kernel was
given: the output of the layer's own gate submodule (captured by a forward hook on it), or,
where that output does not line up with the layer's rows (an ``attention_mask`` that fla
unpads first), recomputed from the layer's input and parameters exactly as its ``forward``
does (fla 0.6.0, ``fla/layers/{gla,hgrn,rwkv6}.py``). Nothing here imports fla: the
layers are matched by their qualified class names.

* GLA (``GatedLinearAttention``): log a_t = logsigmoid(gk_proj(x_t)) /
  gate_logit_normalizer, raised to ``clamp_min`` when set; one decay per (head, key dim),
  shared by the key row's ``head_v_dim`` entries (and by the heads of a key/value group),
  so the RMS and the largest entry over the (dk, dv) state are those over the key dims.
* HGRN (``HGRNAttention``): log a_t = logsigmoid(f_t), f_t = f_proj(x_t) (after the short
  convolution when ``use_short_conv``), lifted to the layer's ``lower_bound`` b (passed by
  ``HGRNModel`` to the layers above the first) as log(b + (1 - b) sigmoid(f_t)); state (D,).
* RWKV-6 (``RWKV6Attention``): log a_t = w_t = -exp(w_proj(x_t, ...)), the data-dependent
  decay of the token-shift LoRA path; one decay per (head, key dim), like GLA.

Sequence boundaries: ``cu_seqlens`` (fla's packed variable-length batch) restarts the state
at each sequence's first token (log a = -inf there, the gains beyond it are 0). A token an
``attention_mask`` removes (GLA unpads it) leaves the state as it was: log a = 0 there.
HGRN and RWKV-6 keep the masked steps in the scan (they zero the input, not the decay), so
their decay there is the one the kernel applied.

Not measured: RWKV-7 (``RWKV7Attention``). Its update S_t = S_{t-1} (diag(w_t) - kk_t
(kk_t * a_t)^T) + v_t k_t^T has a rank-one "delta" correction in the transition itself,
so d S_T / d S_{T-j} is a product of dense (dk, dk) matrices per head, not a diagonal: the
decay alone would report a forgetting the correction can undo. It is left unmeasured
rather than measured wrongly. With a cache (``past_key_values`` holding this layer's
state) the recomputing path returns None (the shifted token it would need is already
overwritten); the captured path is exact either way.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwatch.through_time.families import Recurrence
from gradwatch_torch._probing import capturing

__all__ = ["FLA", "gla_decay", "hgrn_decay", "rwkv6_decay"]


def _get(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    """The forward's argument ``name`` (position ``i`` in fla's signatures), else None."""
    return args[i] if len(args) > i else kwargs.get(name)


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return _get(args, kwargs, 0, "hidden_states")


def _boundaries(log_a: Tensor, cu_seqlens: Any, mask: Tensor | None = None) -> Tensor:
    """log a (B, T, ...) with -inf where a packed sequence starts (``cu_seqlens``, after
    the first) and 0 on the steps a mask removed from the scan (``mask`` (B, T) 0/1)."""
    if mask is not None:
        keep = mask[:, -log_a.shape[1] :].bool().reshape(*mask.shape[:1], log_a.shape[1], *([1] * (log_a.dim() - 2)))
        log_a = log_a.masked_fill(~keep, 0.0)
    if isinstance(cu_seqlens, Tensor) and cu_seqlens.numel() > 2:
        starts = cu_seqlens[1:-1].long()
        starts = starts[(starts > 0) & (starts < log_a.shape[1])]
        log_a = log_a.clone()
        log_a[:, starts] = -math.inf
    return log_a


def _cached(module: Any, args: tuple, kwargs: dict) -> bool:
    """Did the call carry a cache (its state or token shift came from an earlier call)?"""
    return _get(args, kwargs, 2, "past_key_values") is not None


@capturing("gk_proj")
def gla_decay(module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None) -> Tensor:
    """GLA: logsigmoid(gk) / gate_logit_normalizer (at least ``clamp_min``); (B, T, K)
    with K the key dims of one key/value group's heads."""
    x = _hidden(args, kwargs)
    mask, cu = _get(args, kwargs, 1, "attention_mask"), kwargs.get("cu_seqlens")
    gk = inner if inner is not None else module.gk_proj(x)
    log_a = F.logsigmoid(gk.float()) / module.gate_logit_normalizer
    if module.clamp_min is not None:
        log_a = torch.clamp_min(log_a, module.clamp_min)
    # fla unpads by the mask only when no cu_seqlens are given (layers/utils.unpad_hidden_states)
    return _boundaries(log_a, cu, mask if cu is None else None)


@capturing("f_conv1d", "f_proj")
def hgrn_decay(module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None) -> Tensor | None:
    """HGRN: log a = logsigmoid(f), lifted to the lower bound b when the model passes one
    (layers above the first): log(b + (1 - b) sigmoid(f)); (B, T, D)."""
    x = _hidden(args, kwargs)
    cu = kwargs.get("cu_seqlens")
    if inner is None:
        f = module.f_proj(x)
        if module.use_short_conv:
            if _cached(module, args, kwargs):
                return None  # the convolution's window began in an earlier call
            mask = _get(args, kwargs, 1, "attention_mask")
            mask = mask[:, -x.shape[1] :] if mask is not None else None
            f = module.f_conv1d(x=f, mask=mask, cu_seqlens=cu)[0]
        inner = f
    log_a = F.logsigmoid(inner.float())
    bound = kwargs.get("lower_bound")
    if isinstance(bound, Tensor) and module.layer_idx > 0:
        if bound.shape[-1] != log_a.shape[-1]:
            return None  # a per-channel bound the batch cut mistook for a batch (D == B)
        bound = bound.float()
        log_a = torch.logaddexp(bound.log(), torch.log1p(-bound) + log_a)
    return _boundaries(log_a, cu)


@capturing("w_proj")
def rwkv6_decay(module: Any, args: tuple, kwargs: dict, output: Any, inner: Tensor | None = None) -> Tensor | None:
    """RWKV-6: log a = w = -exp(w_proj(x, w_mix, shift)); (B, T, K)."""
    cu = _get(args, kwargs, 5, "cu_seqlens")
    if inner is None:
        if _cached(module, args, kwargs):
            return None
        inner = _rwkv6_w(module, _hidden(args, kwargs), _get(args, kwargs, 1, "attention_mask"), cu)
    return _boundaries(-torch.exp(inner.float()), cu)


def _rwkv6_w(module: Any, x: Tensor, mask: Tensor | None, cu: Any) -> Tensor:
    """``w_proj``'s output as RWKV6Attention.forward computes it without a cache: the
    masked input, its token shift, the five-way LoRA mix (r, w, k, v, g) and x_bias."""
    if mask is not None:
        x = x.mul(mask[:, -x.shape[-2] :, None])
    batch, steps, width = x.shape
    delta = sys.modules[type(module).__module__].token_shift(x, cu)  # fla's own (the layer's module)
    mix = module.x_proj[0](x, delta, cu).view(batch, steps, -1, module.proj_low_rank_dim)
    mix = torch.einsum("b t n r, h n r -> b t n h", module.x_proj[1](mix), module.x_proj[2].weight.view(width, 5, -1))
    return module.w_proj(x, mix[:, :, 1] + module.x_bias[1], delta, cu)


#: fla's diagonal recurrences, by qualified class name (no import of fla).
FLA: list[Recurrence] = [
    Recurrence("fla.layers.gla.GatedLinearAttention", decay=gla_decay, kind="gla", gate="forget"),
    Recurrence("fla.layers.hgrn.HGRNAttention", decay=hgrn_decay, kind="hgrn", gate="forget"),
    Recurrence("fla.layers.rwkv6.RWKV6Attention", decay=rwkv6_decay, kind="rwkv6", gate="decay"),
]
