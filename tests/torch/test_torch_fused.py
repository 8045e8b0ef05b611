"""Issue 20: the fused measurement of many small gradients (gradwatch_torch._fused) and the
device-side scale, against each gradient's own float64 norm and an explicit multiply."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn

from gradwatch_torch._tensors import GradGroups


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        params.append(p)
    return params


def _want(params):
    return torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params])


def test_shapes_of_one_size_scalars_and_strided_gradients_are_each_measured_exactly():
    """Same numel, different shapes ((4, 8), (8, 4), (32,)) are different blocks; a 0-dim
    parameter and a transposed (non-contiguous) gradient are measured as themselves."""
    shapes = [(4, 8), (8, 4), (32,), ()] * 12
    params = _params(shapes)
    params[5].grad = torch.randn(4, 8).t()  # (8, 4), not contiguous
    groups = GradGroups(params)
    assert groups.groups[0].fused is not None
    torch.testing.assert_close(groups.norms().double(), _want(params), rtol=1e-6, atol=0)


def test_the_kept_buffer_follows_new_gradients_and_replaced_tensors():
    """The flat buffer is reused between steps: the next step's norms are the next step's
    gradients', whether autograd wrote into the old tensors or gave new ones."""
    params = _params([(16, 16), (16,)] * 20)
    groups = GradGroups(params)
    first = groups.norms().clone()
    with torch.no_grad():
        for i, p in enumerate(params):
            if i % 2:
                p.grad.mul_(3.0)  # in place
            else:
                p.grad = torch.randn(p.shape) * 0.5  # a new tensor
    second = groups.norms()
    torch.testing.assert_close(second.double(), _want(params), rtol=1e-6, atol=0)
    torch.testing.assert_close(second[1::2], first[1::2] * 3.0, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_gradients_that_require_grad_are_measured_with_grad_mode_on():
    """backward(create_graph=True) leaves gradients that require grad; the fused copy
    (``cat(..., out=)``) must not try to record a graph."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward(create_graph=True)
    params = list(model.parameters())
    assert all(p.grad.requires_grad for p in params)
    groups = GradGroups(params)
    assert groups.groups[0].fused is not None
    with torch.enable_grad():
        got = groups.norms()
    torch.testing.assert_close(got.double(), _want(params).detach(), rtol=1e-6, atol=0)


def test_scale_multiplies_every_present_gradient_in_place_and_leaves_absent_ones():
    """One multiply per (device, dtype) group by a device scalar, bitwise g * scale in the
    gradient's dtype; absent parameters (no gradient, or frozen) are not touched."""
    params = _params([(3, 3)] * 5) + _params([(2,)] * 3, dtype=torch.float64, seed=1)
    params[1].grad = None
    params[2].requires_grad_(False)  # a stale gradient left on a frozen parameter
    before = [None if p.grad is None else p.grad.clone() for p in params]
    groups = GradGroups(params)
    grads = groups.grads()
    scale = torch.tensor(0.3, dtype=torch.float64)
    groups.scale_(grads, scale)
    for p, b in zip(params, before):
        if b is None:
            assert p.grad is None
        elif not p.requires_grad:
            assert torch.equal(p.grad, b)
        else:
            assert torch.equal(p.grad, b * scale.to(b.dtype))
