"""CodebookLinear: layout, decoding against a float64 reference, codebook gradient, zero
pinning under fine-tuning, serialisation, torch.compile."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.kmeans import kmeans_1d
from torchslim.nn import CodebookLinear, MaskedSparseLinear
from torchslim.ops import codebook_linear
from torchslim.ops._reference import ref_codebook_linear, unpack_int4


def _linear(in_f, out_f, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _labels(layer):
    """Unpacked [out, in] indices (int64), decoded independently of the module."""
    idx = layer.indices
    if idx.shape[1] != layer.in_features:
        idx = unpack_int4(idx, layer.in_features)
    return idx.long()


def _ref_forward(layer, x):
    """float64 reference: x @ codebook[indices].T + bias (codebook[0] := 0 when pinned)."""
    cb = layer.codebook.detach().double().clone()
    if layer.zero_pinned:
        cb[0] = 0.0
    w = cb[_labels(layer)]
    b = layer.bias.detach().double() if layer.bias is not None else None
    return F.linear(x.double(), w, b)


# ---- construction and layout ---------------------------------------------------------------
@pytest.mark.parametrize("k,in_f,cols", [(1, 7, 4), (2, 7, 4), (16, 7, 4), (16, 8, 4), (17, 7, 7), (256, 5, 5)])
def test_indices_layout(k, in_f, cols):
    layer = CodebookLinear(in_f, 3, num_clusters=k)
    assert layer.indices.dtype == torch.uint8
    assert tuple(layer.indices.shape) == (3, cols)
    assert tuple(layer.codebook.shape) == (k,)
    assert isinstance(layer.codebook, nn.Parameter)
    assert "indices" in dict(layer.named_buffers())
    assert layer.bits == (4 if k <= 16 else 8)
    assert int(_labels(layer).max()) < k
    assert tuple(layer.weight.shape) == (3, in_f)


@pytest.mark.parametrize("k", [0, 257, -1, 2.5, True, "16"])
def test_bad_num_clusters(k):
    with pytest.raises(ValueError, match="num_clusters"):
        CodebookLinear(4, 3, num_clusters=k)
    with pytest.raises(ValueError, match="num_clusters"):
        CodebookLinear.from_dense(_linear(4, 3), num_clusters=k)


def test_from_dense_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        CodebookLinear.from_dense(_linear(4, 3), init="uniform")
    with pytest.raises(TypeError, match="nn.Linear"):
        CodebookLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mask"):
        CodebookLinear.from_dense(_linear(4, 3), mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=">= 2"):
        CodebookLinear.from_dense(_linear(4, 3), num_clusters=1, mask=torch.rand(3, 4) > 0.5)


@pytest.mark.parametrize("k", [16, 40])
@pytest.mark.parametrize("width", [6, 8, 13, 14])
def test_wrong_input_width_is_an_error(k, width):
    """in_features = 7: with 4-bit packed indices ([3, 4]) an input of width 8 (or 7's
    double, 14) would be a valid-looking unpacked or packed call to the functional op; the
    layer knows its width and refuses it."""
    layer = CodebookLinear.from_dense(_linear(7, 3), num_clusters=k)
    with pytest.raises(ValueError, match="in_features = 7"):
        layer(torch.randn(2, width))
    assert layer(torch.randn(2, 7)).shape == (2, 3)


def test_weight_is_read_only():
    layer = CodebookLinear(4, 3)
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(AttributeError):
        del layer.weight


def test_extra_repr():
    text = repr(CodebookLinear.from_dense(_linear(6, 4), num_clusters=32, mask=torch.rand(4, 6) > 0.3))
    assert "K=32" in text and "bits=8" in text and "zero_pinned=True" in text
    assert "K=16, bits=4, zero_pinned=False" in repr(CodebookLinear(6, 4))


# ---- forward against the float64 reference ------------------------------------------------
@pytest.mark.parametrize("k", [2, 16, 17, 256])
@pytest.mark.parametrize("in_f,out_f", [(1, 3), (2, 5), (33, 17), (64, 10)])
def test_forward_matches_float64_reference(k, in_f, out_f):
    layer = CodebookLinear.from_dense(_linear(in_f, out_f, seed=k + in_f), num_clusters=k)
    x = torch.randn(6, in_f)
    torch.testing.assert_close(layer(x).double(), _ref_forward(layer, x), rtol=1e-5, atol=1e-5)
    # decoded weight == codebook[indices]
    torch.testing.assert_close(layer.weight, layer.codebook.detach()[_labels(layer)], rtol=0, atol=0)


def test_forward_shapes_batch_3d_empty_noncontiguous():
    layer = CodebookLinear.from_dense(_linear(9, 5), num_clusters=16, mask=torch.rand(5, 9) > 0.4)
    x3 = torch.randn(2, 3, 9)
    torch.testing.assert_close(layer(x3).double(), _ref_forward(layer, x3), rtol=1e-5, atol=1e-5)
    assert layer(torch.randn(0, 9)).shape == (0, 5)
    xt = torch.randn(9, 4).t()
    assert not xt.is_contiguous()
    torch.testing.assert_close(layer(xt).double(), _ref_forward(layer, xt), rtol=1e-5, atol=1e-5)
    nobias = CodebookLinear.from_dense(_linear(9, 5, bias=False), num_clusters=8)
    assert nobias.bias is None
    torch.testing.assert_close(nobias(x3).double(), _ref_forward(nobias, x3), rtol=1e-5, atol=1e-5)


def test_from_dense_assigns_nearest_centroid():
    lin = _linear(40, 30)
    layer = CodebookLinear.from_dense(lin, num_clusters=8)
    w = lin.weight.detach()
    dist = (w.unsqueeze(-1) - layer.codebook.detach()).abs()
    chosen = dist.gather(-1, _labels(layer).unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= dist.min(-1).values + 1e-7)
    # the codebook is k-means of the weights
    torch.testing.assert_close(layer.codebook.detach().double(), kmeans_1d(w, 8).centroids)
    rel = (layer.weight.detach() - w).norm() / w.norm()
    assert layer.reconstruction_error == pytest.approx(float(rel), rel=1e-4)
    assert 0 < layer.reconstruction_error < 0.2


def test_to_dense():
    layer = CodebookLinear.from_dense(_linear(11, 6), num_clusters=16, mask=torch.rand(6, 11) > 0.5)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense.weight, layer.weight, rtol=0, atol=0)
    x = torch.randn(4, 11)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)


# ---- pruned layers --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [4, 16, 64])
def test_pruned_layer_keeps_exact_zeros(k):
    lin = _linear(30, 20, seed=k)
    torch.manual_seed(k)
    mask = torch.rand(20, 30) > 0.6
    sparse = MaskedSparseLinear.from_dense(lin, mask)
    layer = CodebookLinear.from_dense(sparse, num_clusters=k)
    assert layer.zero_pinned
    assert float(layer.codebook.detach()[0]) == 0.0
    labels = _labels(layer)
    assert torch.equal(labels == 0, ~mask)  # pruned <-> index 0, kept never index 0
    assert torch.all(layer.weight[~mask] == 0)
    # the other K-1 centroids are k-means of the kept weights only
    kept = lin.weight.detach()[mask]
    torch.testing.assert_close(layer.codebook.detach()[1:].double(), kmeans_1d(kept, k - 1).centroids)


def test_mask_argument_and_intersection():
    lin = _linear(12, 8)
    m1 = torch.rand(8, 12) > 0.3
    m2 = torch.rand(8, 12) > 0.3
    layer = CodebookLinear.from_dense(lin, mask=m1)
    assert torch.equal(_labels(layer) == 0, ~m1)
    both = CodebookLinear.from_dense(MaskedSparseLinear.from_dense(lin, m1), mask=m2)
    assert torch.equal(_labels(both) == 0, ~(m1 & m2))
    plain = CodebookLinear.from_dense(lin)
    assert not plain.zero_pinned


def test_fully_pruned_layer():
    lin = _linear(5, 4)
    layer = CodebookLinear.from_dense(lin, num_clusters=4, mask=torch.zeros(4, 5, dtype=torch.bool))
    assert torch.all(layer.weight == 0)
    assert layer(torch.randn(3, 5)).shape == (3, 4)


# ---- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("k,pinned", [(16, False), (16, True), (40, False), (40, True)])
def test_codebook_gradient_is_scatter_sum_of_weight_gradient(k, pinned):
    lin = _linear(13, 9, seed=k)
    mask = (torch.rand(9, 13) > 0.4) if pinned else None
    layer = CodebookLinear.from_dense(lin, num_clusters=k, mask=mask).double()
    x = torch.randn(7, 13, dtype=torch.float64)
    g = torch.randn(7, 9, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    # the same loss through the decoded dense weight
    w = layer.weight.detach().clone().requires_grad_(True)
    (F.linear(x, w, layer.bias.detach()) * g).sum().backward()
    expected = torch.zeros(k, dtype=torch.float64).scatter_add_(0, _labels(layer).reshape(-1), w.grad.reshape(-1))
    if pinned:
        expected[0] = 0.0
        assert float(layer.codebook.grad[0]) == 0.0
    torch.testing.assert_close(layer.codebook.grad, expected)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    assert not layer.indices.requires_grad


def test_gradcheck_input_codebook_bias():
    layer = CodebookLinear.from_dense(_linear(6, 4, dtype=torch.float64), num_clusters=5)
    idx = layer.indices

    def fn(x, cb, b):
        return codebook_linear(x, idx, cb, b)

    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    cb = layer.codebook.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, cb, b))


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_pinned_zero_survives_finetuning_with_weight_decay(opt_name):
    lin = _linear(24, 12, seed=3)
    mask = torch.rand(12, 24) > 0.5
    layer = CodebookLinear.from_dense(lin, num_clusters=16, mask=mask)
    params = list(layer.parameters())
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
           "adam": lambda: torch.optim.Adam(params, lr=0.05, weight_decay=0.1),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)}[opt_name]()
    before = layer.codebook.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        x = torch.randn(16, 24)
        loss = (layer(x) - torch.randn(16, 12)).pow(2).mean()
        loss.backward()
        opt.step()
    assert float(layer.codebook.detach()[0]) == 0.0
    assert torch.all(layer.weight[~mask] == 0)
    assert not torch.equal(layer.codebook.detach()[1:], before[1:])  # the rest did train
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x).double(), _ref_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_pinned_forward_ignores_a_nonzero_stored_slot():
    layer = CodebookLinear.from_dense(_linear(8, 4), num_clusters=8, mask=torch.rand(4, 8) > 0.5)
    with torch.no_grad():
        layer.codebook[0] = 5.0  # e.g. written from outside
    assert torch.all(layer.weight[_labels(layer) == 0] == 0)


# ---- serialisation, copies, devices and dtypes ------------------------------------------------
def _pinned_layer():
    return CodebookLinear.from_dense(_linear(10, 6, seed=5), num_clusters=16, mask=torch.rand(6, 10) > 0.5)


def test_state_dict_round_trip():
    for src in (_pinned_layer(), CodebookLinear.from_dense(_linear(10, 6), num_clusters=100)):
        sd = src.state_dict()
        assert set(sd) == {"codebook", "indices", "bias"}
        assert sd["indices"].dtype == torch.uint8
        dst = CodebookLinear(10, 6, num_clusters=src.num_clusters, zero_pinned=src.zero_pinned)
        dst.load_state_dict(sd)
        x = torch.randn(3, 10)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        dst.load_state_dict(torch.load(buf, weights_only=True))
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_deepcopy_and_pickle():
    src = _pinned_layer()
    x = torch.randn(3, 10)
    for dst in (copy.deepcopy(src), pickle.loads(pickle.dumps(src))):
        assert dst.codebook is not src.codebook
        assert dst.zero_pinned and dst.indices.dtype == torch.uint8
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
        dst.codebook.data.add_(1.0)  # pinned slot still reads 0 in the copy
        assert torch.all(dst.weight[_labels(dst) == 0] == 0)


def test_to_dtype_keeps_uint8_indices():
    src = _pinned_layer()
    d = copy.deepcopy(src).to(torch.float64)
    assert d.codebook.dtype == torch.float64 and d.indices.dtype == torch.uint8
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(d(x), _ref_forward(src, x), rtol=1e-6, atol=1e-6)
    h = copy.deepcopy(src).half()
    assert h.indices.dtype == torch.uint8 and h.codebook.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_round_trip():
    src = _pinned_layer()
    d = copy.deepcopy(src).to("cuda")
    assert d.indices.dtype == torch.uint8 and d.indices.is_cuda
    x = torch.randn(3, 10)
    torch.testing.assert_close(d(x.cuda()).cpu(), src(x), rtol=1e-4, atol=1e-4)
    again = CodebookLinear.from_dense(nn.Linear(10, 6).cuda(), num_clusters=16)
    assert again.codebook.is_cuda and again.indices.is_cuda


# ---- torch.compile ------------------------------------------------------------------------------
def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        CodebookLinear.from_dense(nn.Linear(12, 16), num_clusters=16, mask=torch.rand(16, 12) > 0.5),
        nn.ReLU(),
        CodebookLinear.from_dense(nn.Linear(16, 5), num_clusters=64),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, )
    x = torch.randn(4, 12)
    y = compiled(x)
    y_ref = eager(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    assert float(model[0].codebook.grad[0]) == 0.0


# ---- takeover of other layer types, devices -------------------------------------------------
def _conv1d(in_f, out_f):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(out_f, in_f)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv


def _as_linear(conv):
    lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


@pytest.mark.parametrize("k", [16, 40])
def test_from_dense_conv1d_equals_the_linear_form(k):
    conv = _conv1d(13, 9)
    layer = CodebookLinear.from_dense(conv, num_clusters=k)
    twin = CodebookLinear.from_dense(_as_linear(conv), num_clusters=k)
    assert (layer.in_features, layer.out_features) == (13, 9)
    assert torch.equal(layer.indices, twin.indices) and torch.equal(layer.codebook, twin.codebook)
    x = torch.randn(2, 3, 13)
    torch.testing.assert_close(layer(x), twin(x))
    # and it computes the clustered version of the Conv1D's function
    torch.testing.assert_close(layer(x).double(), ref_codebook_linear(x.double(), layer.indices,
                                                                       layer.codebook.detach().double(),
                                                                       layer.bias.detach().double()),
                               rtol=1e-5, atol=1e-5)
    assert layer.reconstruction_error < 0.2


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_dense_torch_pruned_layer_keeps_its_mask(kind):
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer_in = _linear(20, 12) if kind == "linear" else _conv1d(20, 12)
    prune.random_unstructured(layer_in, "weight", amount=0.6)
    mask = layer_in.weight_mask != 0
    if kind == "conv1d":
        mask = mask.t()
    layer = CodebookLinear.from_dense(layer_in, num_clusters=8)
    assert layer.zero_pinned
    assert torch.equal(layer.labels() == 0, ~mask)  # pruned positions index the pinned zero
    assert bool((layer.weight[~mask] == 0).all())
    x = torch.randn(5, 20)
    # close to the pruned layer (8 shared values), and exactly zero where pruned
    err = (layer(x) - layer_in(x)).abs().max() / layer_in(x).abs().max()
    assert float(err) < 0.3


def test_from_dense_rejects_other_types_clearly():
    for bad in (nn.Conv2d(1, 1, 1), nn.Embedding(4, 3), nn.LayerNorm(4)):
        with pytest.raises(TypeError, match="nn.Linear"):
            CodebookLinear.from_dense(bad)


@pytest.mark.parametrize("k", [16, 40])
def test_meta_input_to_cpu_layer_raises(k):
    layer = CodebookLinear.from_dense(_linear(7, 3), num_clusters=k)
    x = torch.randn(2, 7, device="meta")
    with pytest.raises(RuntimeError):
        nn.Linear(7, 3)(x)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layer(x)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        layer(x.requires_grad_())
