"""Every public entry point of the torchslim layers works inside torch.inference_mode().

Layers built, loaded, copied or converted inside inference_mode must run correctly on
every forward (each compared in float64 with the plain-PyTorch definition), and a layer
built there holds ordinary tensors, so that it can be trained outside afterwards.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.nn import CodebookLinear, MaskedSparseLinear, SparseSequential, force_path
from torchslim.nn.masked_sparse_linear import pack_mask_bits
from torchslim.ops._reference import ref_codebook_linear

IN, OUT = 300, 200  # > 32768 weights: batch 1 at density 0.1 takes the sparse path by the rule


def _linear(seed=0, in_f=IN, out_f=OUT):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
        lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def _mask(seed=0, density=0.1, shape=(OUT, IN)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < density


def _ref_masked(layer, x):
    return F.linear(x.double(), torch.where(layer.mask, layer.weight.detach().double(), 0.0),
                    None if layer.bias is None else layer.bias.detach().double())


def _check_masked(layer, x, expect_path=None):
    """Every call: twice (cache built, cache reused), compared with the float64 reference."""
    for _ in range(2):
        y = layer(x)
        torch.testing.assert_close(y.double(), _ref_masked(layer, x), rtol=1e-5, atol=1e-5)
        if expect_path is not None:
            assert layer.last_path == expect_path
    return y


INPUTS = {"batch1": (1, IN), "batch7": (7, IN), "3d": (2, 3, IN), "empty": (0, IN)}


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("path", [None, "sparse", "dense"])
def test_masked_built_inside_inference_mode(shape, path):
    x = torch.randn(*shape)
    with torch.inference_mode(), force_path(path):
        layer = MaskedSparseLinear.from_dense(_linear(), _mask())
        assert not layer.weight.is_inference() and not layer.mask.is_inference()
        _check_masked(layer, x, expect_path=path)
        if path is None:
            assert layer.last_path == "sparse"  # density 0.1: sparse by the rule at any batch
    # Built in inference_mode, trained outside it: ordinary tensors with gradients.
    xg = torch.randn(4, IN, requires_grad=True)
    layer(xg).square().sum().backward()
    assert bool((layer.weight.grad[~layer.mask] == 0).all()) and float(layer.weight.grad.abs().max()) > 0


def test_masked_constructor_set_mask_density_repr_to_dense_inside_inference_mode():
    x = torch.randn(5, IN)
    with torch.inference_mode():
        layer = MaskedSparseLinear(IN, OUT)
        _check_masked(layer, x)
        layer.set_mask(_mask(1, 0.2))
        assert layer.density == pytest.approx(float(_mask(1, 0.2).float().mean()))
        assert bool((layer.weight[~layer.mask] == 0).all())
        _check_masked(layer, x)
        assert "density=" in repr(layer)
        dense = layer.to_dense()
        assert type(dense) is nn.Linear and not dense.weight.is_inference()
        torch.testing.assert_close(dense(x).double(), _ref_masked(layer, x), rtol=1e-5, atol=1e-5)
        layer.refresh()
        _check_masked(layer, x)


def test_masked_in_place_edits_inside_inference_mode_are_seen():
    """The layer's tensors are ordinary, so edits made in inference_mode move their versions."""
    x = torch.randn(3, IN)
    with torch.inference_mode():
        layer = MaskedSparseLinear.from_dense(_linear(), _mask())
        before = _check_masked(layer, x)
        layer.weight.mul_(2.0)
        after = _check_masked(layer, x)
        assert not torch.allclose(after, before)
        layer.mask[:, :50] = True
        _check_masked(layer, x)


def test_masked_state_dict_and_load_inside_inference_mode():
    src = MaskedSparseLinear.from_dense(_linear(1), _mask(1))
    x = torch.randn(4, IN)
    with torch.inference_mode():
        sd = src.state_dict()
        assert sd["mask"].dtype == torch.uint8
        layer = MaskedSparseLinear.from_dense(_linear(2), _mask(2))
        _check_masked(layer, x)  # warm the caches of the old state
        layer.load_state_dict(sd)
        assert torch.equal(layer.mask, src.mask)
        torch.testing.assert_close(_check_masked(layer, x), src(x).detach())
        # An old checkpoint: bool mask.
        old = {**sd, "mask": _mask(3)}
        layer.load_state_dict(old)
        assert torch.equal(layer.mask, _mask(3))
        _check_masked(layer, x)
    # Loaded inside inference_mode, run outside it.
    _check_masked(layer, x)


def test_masked_state_dict_made_inside_inference_mode_loads_outside():
    with torch.inference_mode():
        src = MaskedSparseLinear.from_dense(_linear(1), _mask(1))
        sd = src.state_dict()
    layer = MaskedSparseLinear(IN, OUT)
    layer.load_state_dict(sd)
    x = torch.randn(2, IN)
    torch.testing.assert_close(_check_masked(layer, x), _check_masked(src, x))


def test_masked_loaded_with_assign_inside_inference_mode():
    """load_state_dict(assign=True) of inference tensors: the layer then holds them."""
    x = torch.randn(4, IN)
    with torch.inference_mode():
        sd = MaskedSparseLinear.from_dense(_linear(1), _mask(1)).state_dict()
        sd = {k: v.clone() for k, v in sd.items()}  # inference tensors
        layer = MaskedSparseLinear(IN, OUT, device="meta")
        layer.load_state_dict(sd, assign=True)
        assert layer.weight.is_inference()
        _check_masked(layer, x)
    with torch.no_grad():
        _check_masked(layer, x)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "to_float64"])
def test_masked_copies_inside_inference_mode(copier):
    layer = MaskedSparseLinear.from_dense(_linear(), _mask())
    x = torch.randn(3, IN)
    _check_masked(layer, x)
    with torch.inference_mode():
        if copier == "deepcopy":
            dup = copy.deepcopy(layer)
            assert dup.weight.is_inference()  # (Parameter.__deepcopy__ clones in inference mode)
        elif copier == "pickle":
            dup = pickle.loads(pickle.dumps(layer))
        else:
            dup = copy.deepcopy(layer).to(torch.float64)
            x = x.double()
        for _ in range(3):
            _check_masked(dup, x)
        dup.set_mask(_mask(5))
        _check_masked(dup, x)


def test_masked_takeover_inside_inference_mode():
    from torch.nn.utils import prune

    lin = _linear()
    prune.l1_unstructured(lin, "weight", amount=0.9)
    x = torch.randn(2, IN)
    with torch.inference_mode():
        layer = MaskedSparseLinear.from_dense(lin)
        assert torch.equal(layer.mask, lin.weight_mask != 0)
        torch.testing.assert_close(layer(x), lin(x))


def test_to_sparse_inside_inference_mode():
    """A model passed through torchslim.to_sparse inside inference_mode (its copy then holds
    inference tensors): every forward works, fused or not."""
    model = nn.Sequential(MaskedSparseLinear.from_dense(_linear(0), _mask(0)), nn.ReLU(),
                          MaskedSparseLinear.from_dense(_linear(1, OUT, 64), _mask(1, 0.1, (64, OUT)))).eval()
    x = torch.randn(3, IN)
    want = model(x).detach()
    with torch.inference_mode():
        fast = torchslim.to_sparse(model)
        assert isinstance(fast, SparseSequential)
        for _ in range(3):
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
            assert fast[0].last_path == "fused"
        with force_path("dense"):
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
            assert fast[0].last_path == "dense"
        fast[0].set_mask(_mask(4))
        want2 = fast[2](fast[1](_ref_masked(fast[0], x).float()))
        torch.testing.assert_close(fast(x), want2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), want2, rtol=1e-5, atol=1e-5)


def test_sparse_sequential_built_inside_inference_mode():
    x = torch.randn(1, IN)
    with torch.inference_mode():
        seq = SparseSequential(MaskedSparseLinear.from_dense(_linear(0), _mask(0)), nn.ReLU(),
                               MaskedSparseLinear.from_dense(_linear(1, OUT, 10), _mask(1, 0.3, (10, OUT)))).eval()
        want = seq[2](seq[1](seq[0](x)))
        for _ in range(2):
            torch.testing.assert_close(seq(x), want, rtol=1e-5, atol=1e-5)
        assert seq[0].last_path == "fused"


# --------------------------------------------------------------------------- CodebookLinear


def _ref_codebook(layer, x):
    return ref_codebook_linear(x.double(), layer.indices, layer.effective_codebook().detach().double(),
                               None if layer.bias is None else layer.bias.detach().double())


@pytest.mark.parametrize("k", [16, 40])
def test_codebook_entry_points_inside_inference_mode(k):
    x = torch.randn(2, 3, 30)
    with torch.inference_mode():
        fresh = CodebookLinear(30, 20, num_clusters=k)
        torch.testing.assert_close(fresh(x).double(), _ref_codebook(fresh, x), rtol=1e-5, atol=1e-5)
        layer = CodebookLinear.from_dense(_linear(0, 30, 20), num_clusters=k, mask=_mask(0, 0.5, (20, 30)))
        assert not layer.codebook.is_inference()
        torch.testing.assert_close(layer(x).double(), _ref_codebook(layer, x), rtol=1e-5, atol=1e-5)
        w = layer.weight
        assert w.shape == (20, 30)
        dense = layer.to_dense()
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
        layer.assign_indices(_linear(3, 30, 20).weight)
        torch.testing.assert_close(layer(x).double(), _ref_codebook(layer, x), rtol=1e-5, atol=1e-5)
        sd = layer.state_dict()
        other = CodebookLinear(30, 20, num_clusters=k, zero_pinned=True)
        other.load_state_dict(sd)
        torch.testing.assert_close(other(x), layer(x))
        dup = copy.deepcopy(layer)
        torch.testing.assert_close(dup(x), layer(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x), layer(x))
        torch.testing.assert_close(copy.deepcopy(layer).double()(x.double()).float(), layer(x), rtol=1e-5, atol=1e-5)
        from_masked = CodebookLinear.from_dense(MaskedSparseLinear.from_dense(_linear(0, 30, 20)), num_clusters=k)
        torch.testing.assert_close(from_masked(x).double(), _ref_codebook(from_masked, x), rtol=1e-5, atol=1e-5)
    # Built inside inference_mode, fine-tuned outside.
    layer(x).sum().backward()
    assert layer.codebook.grad is not None and float(layer.codebook.grad.abs().max()) > 0


def test_pack_mask_bits_inside_inference_mode():
    with torch.inference_mode():
        m = _mask(0, 0.5, (3, 13))
        assert pack_mask_bits(m).shape == (3, 2)


def test_codebook_small_entry_points_inside_inference_mode():
    with torch.inference_mode():
        layer = CodebookLinear(9, 4, num_clusters=16, zero_pinned=True)
        layer.reset_parameters()
        assert layer.labels().shape == (4, 9) and layer.bits == 4 and layer.packed
        assert float(layer.effective_codebook()[0]) == 0.0
        assert "K=16" in repr(layer)


def test_functional_ops_inside_inference_mode():
    from torchslim import ops
    from torchslim.ops._reference import pack_int4, ref_masked_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 300, generator=g)
    w = torch.randn(200, 300, generator=g)
    mask = _mask(0)
    b = torch.randn(200, generator=g)
    labels = torch.randint(0, 16, (200, 300), generator=g, dtype=torch.uint8)
    cb = torch.randn(16, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(ops.masked_linear(x, w, mask, b).double(),
                                   ref_masked_linear(x.double(), w.double(), mask, b.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.codebook_linear(x, pack_int4(labels), cb, b).double(),
                                   ref_codebook_linear(x.double(), labels, cb.double(), b.double()),
                                   rtol=1e-5, atol=1e-5)
