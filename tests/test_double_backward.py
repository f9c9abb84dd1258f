"""Double backward (create_graph=True) through the torchslim layers and functional ops.

A gradient penalty ||d loss / d x||^2 needs the backward itself to be differentiable. Each
case is compared, in float64, with the same penalty computed through plain nn.Linear /
F.linear on the layer's effective weight (the reference), for the input, weight (or
codebook) and bias gradients; and gradgradcheck runs on the functional ops.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import ops
from torchslim.nn import CodebookLinear, MaskedSparseLinear, force_path
from torchslim.ops._reference import pack_int4, unpack_int4

DT = torch.float64


def _penalty(fn, x):
    """sum(out) + ||d sum(out^2) / dx||^2: first- and second-order terms together."""
    out = fn(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    return out.sum() + gx.square().sum()


def _masked_case(sparse_mask_density, in_f=70, out_f=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=DT))
        lin.bias.copy_(torch.randn(out_f, generator=g, dtype=DT))
    mask = torch.rand(out_f, in_f, generator=g) < sparse_mask_density
    return MaskedSparseLinear.from_dense(lin, mask), mask


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("lead", [(6,), (2, 3), (1,)])
def test_masked_module_gradient_penalty_matches_linear(path, lead):
    layer, mask = _masked_case(0.2)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(*lead, 70, generator=g, dtype=DT)

    # Reference: nn.Linear on the masked weight, gradients taken w.r.t. the dense weight.
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xr = x0.clone().requires_grad_()
    ref = _penalty(lambda t: F.linear(t, w * mask, b), xr)
    ref.backward()

    x = x0.clone().requires_grad_()
    with force_path(path):
        got = _penalty(layer, x)
        assert layer.last_path == path
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad * mask)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    assert bool((layer.weight.grad[~mask] == 0).all()), "a masked weight got a gradient"
    assert float(layer.weight.grad.abs().max()) > 0


def test_masked_sparse_path_second_order_weight_term_is_not_zero():
    """The second-order weight gradient alone (issue: it came back 0 on the sparse path)."""
    layer, mask = _masked_case(0.2)
    x = torch.randn(5, 70, dtype=DT, requires_grad=True)
    with force_path("sparse"):
        out = layer(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), layer.weight)
    w = (layer.weight.detach() * mask).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    (gxr,) = torch.autograd.grad(F.linear(xr, w, layer.bias.detach()).square().sum(), xr, create_graph=True)
    (gwr,) = torch.autograd.grad(gxr.square().sum(), w)
    torch.testing.assert_close(gw, gwr * mask)
    assert float(gw.abs().max()) > 1.0


def test_masked_module_gradgradcheck():
    layer, mask = _masked_case(0.3, in_f=9, out_f=7)
    x = torch.randn(4, 9, dtype=DT, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    for path in ("sparse", "dense"):
        with force_path(path):
            fn = lambda inp, wt, bs: torch.func.functional_call(layer, {"weight": wt, "bias": bs}, (inp,))  # noqa: E731
            assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("with_bias", [True, False])
def test_functional_masked_linear_gradgradcheck(with_bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(5, 6, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=DT, requires_grad=True) if with_bias else None
    mask = torch.rand(5, 6, generator=g) < 0.5
    args = (x, w, b) if with_bias else (x, w)
    fn = (lambda i, wt, bs: ops.masked_linear(i, wt, mask, bs)) if with_bias else (lambda i, wt: ops.masked_linear(i, wt, mask))
    assert torch.autograd.gradgradcheck(fn, args)
    # And the penalty against F.linear on the masked weight.
    wr = w.detach().clone().requires_grad_()
    ref = _penalty(lambda t: F.linear(t, wr * mask, b), x)
    (gref,) = torch.autograd.grad(ref, wr)
    got = _penalty(lambda t: ops.masked_linear(t, w, mask, b), x)
    (ggot,) = torch.autograd.grad(got, w)
    torch.testing.assert_close(ggot, gref * mask)


@pytest.mark.parametrize("k", [16, 40])
def test_functional_codebook_linear_gradgradcheck(k):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, generator=g, dtype=DT, requires_grad=True)
    labels = torch.randint(0, k, (5, 7), generator=g, dtype=torch.uint8)
    indices = pack_int4(labels) if k <= 16 else labels
    codebook = torch.randn(k, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda i, c, bs: ops.codebook_linear(i, indices, c, bs), (x, codebook, b))


@pytest.mark.parametrize("k,pinned", [(16, False), (40, False), (16, True)])
def test_codebook_module_gradient_penalty_matches_linear(k, pinned):
    torch.manual_seed(0)
    lin = nn.Linear(11, 8, dtype=DT)
    mask = torch.rand(8, 11) < 0.6 if pinned else None
    layer = CodebookLinear.from_dense(lin, num_clusters=k, mask=mask)
    assert layer.zero_pinned == pinned
    labels = layer.labels().long()
    x0 = torch.randn(2, 4, 11, dtype=DT)

    # Reference: F.linear on codebook[labels] (with slot 0 held at 0 when pinned).
    cb = layer.codebook.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xr = x0.clone().requires_grad_()

    def ref_fn(t):
        eff = F.pad(cb[1:], (1, 0)) if pinned else cb
        return F.linear(t, eff[labels], b)

    ref = _penalty(ref_fn, xr)
    ref.backward()
    x = x0.clone().requires_grad_()
    got = _penalty(layer, x)
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.codebook.grad, cb.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    assert float(layer.codebook.grad.abs().max()) > 0
    if pinned:
        assert float(layer.codebook.grad[0]) == 0.0


def test_codebook_unpack_matches_labels():
    """(the double-backward formula decodes packed indices with unpack_int4)"""
    layer = CodebookLinear.from_dense(nn.Linear(9, 4), num_clusters=16)
    torch.testing.assert_close(unpack_int4(layer.indices, 9), layer.labels())
