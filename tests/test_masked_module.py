"""torchslim.nn.MaskedSparseLinear: the contract, the cached structure and its invalidation."""
import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.nn import MaskedSparseLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_layer(in_f=48, out_f=40, sparsity=0.9, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    mask = torch.rand(out_f, in_f) >= sparsity
    return MaskedSparseLinear.from_dense(lin, mask), lin, mask


def reference(layer, x):
    w = (layer.weight * layer.mask).double()
    return F.linear(x.double(), w, None if layer.bias is None else layer.bias.double())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("lead", [(1,), (7,), (33,), (2, 3), (0,)])
def test_forward_backward_match_reference(sparsity, lead):
    layer, _, mask = make_layer(sparsity=sparsity)
    x = torch.randn(*lead, 48, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().double().requires_grad_()
    wr = layer.weight.detach().double().requires_grad_()
    br = layer.bias.detach().double().requires_grad_()
    F.linear(xr, wr * mask, br).backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad.double(), br.grad, rtol=1e-4, atol=1e-4)
    assert bool((layer.weight.grad[~mask] == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-4, atol=1e-4)


def test_dense_path_gradcheck_float64():
    """The dense path (density above the sparse rule) in float64: gradcheck through the
    module for input, weight and bias."""
    lin = nn.Linear(9, 6, dtype=torch.float64)
    layer = MaskedSparseLinear.from_dense(lin, mask=torch.rand(6, 9) < 0.7)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    layer(x)
    assert layer.last_path == "dense"
    torch.autograd.gradcheck(lambda inp, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (inp,)),
                             (x, layer.weight.detach().clone().requires_grad_(),
                              layer.bias.detach().clone().requires_grad_()))


def test_paths_and_density():
    sparse, _, mask = make_layer(sparsity=0.9)
    dense, _, _ = make_layer(sparsity=0.0)
    big, _, _ = make_layer(400, 100, sparsity=0.9)
    small, _, _ = make_layer(sparsity=0.9)
    with torch.no_grad():
        big(torch.randn(1, 400))
        assert big.last_path == "sparse"
        small(torch.randn(1, 48))
        assert small.last_path == "dense"  # tiny layer at batch 1: a dense call is cheaper
    assert sparse.density == pytest.approx(mask.float().mean().item())
    assert dense.density == 1.0
    with torch.no_grad():
        sparse(torch.randn(4, 48))
        dense(torch.randn(4, 48))
    assert sparse.last_path == "sparse" and dense.last_path == "dense"
    assert "density=" in repr(sparse)


def test_from_dense_default_mask_and_to_dense():
    lin = nn.Linear(20, 10)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    layer = MaskedSparseLinear.from_dense(lin)
    assert torch.equal(layer.mask, lin.weight != 0)
    back = layer.to_dense()
    assert isinstance(back, nn.Linear)
    x = torch.randn(5, 20)
    torch.testing.assert_close(back(x), lin(x))
    torch.testing.assert_close(layer(x), lin(x))
    with pytest.raises(TypeError):
        MaskedSparseLinear.from_dense(nn.Conv1d(1, 1, 1))


def test_set_mask_checks_and_invalidates():
    layer, _, _ = make_layer(sparsity=0.9)
    x = torch.randn(3, 48)
    layer(x)
    new = torch.rand(40, 48) > 0.8
    layer.set_mask(new)
    assert torch.equal(layer.mask, new)
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-4, atol=1e-4)
    layer.set_mask(new.float())  # nonzero = kept
    assert layer.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="shape"):
        layer.set_mask(torch.ones(48, 40, dtype=torch.bool))
    with pytest.raises(TypeError):
        layer.set_mask([[True]])


@pytest.mark.parametrize("batch,in_f", [(1, 48), (1, 900), (20, 48)])
def test_cache_invalidation(batch, in_f):
    layer, _, _ = make_layer(in_f, 40, sparsity=0.9)
    x = torch.randn(batch, in_f)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-4, atol=1e-4)

    check()
    layer.mask[:, :5] = True  # in-place edit of the mask
    check()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in-place edit of the weight
    check()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["mask"] = torch.rand(40, in_f) > 0.95
    state["weight"] = torch.randn(40, in_f)
    layer.load_state_dict(state)
    check()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(8, in_f)).square().sum().backward()
    opt.step()
    check()
    layer.mask.data = torch.rand(40, in_f) > 0.9  # storage swap
    check()
    layer.weight.data = torch.randn(40, in_f)
    check()


def test_state_dict_round_trip_deepcopy_pickle():
    layer, _, _ = make_layer(sparsity=0.8)
    x = torch.randn(6, 48)
    want = layer(x).detach()
    sd = layer.state_dict()
    # The mask is stored bit-packed: uint8 [out, ceil(in / 8)].
    assert set(sd) == {"weight", "bias", "mask"} and sd["mask"].dtype == torch.uint8
    assert tuple(sd["mask"].shape) == (40, 6)
    other = MaskedSparseLinear(48, 40)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), want)
    torch.testing.assert_close(copy.deepcopy(layer)(x), want)
    torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x), want)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), want)
    twin = copy.deepcopy(layer)
    twin.mask.zero_()  # the copy has its own mask and cache
    torch.testing.assert_close(layer(x), want)


def test_to_dtype():
    layer, _, _ = make_layer(sparsity=0.9)
    x = torch.randn(5, 48)
    layer(x)
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.mask.dtype == torch.bool
    y = layer(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-10, atol=1e-10)
    layer.to(torch.bfloat16)
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), reference(layer, x.bfloat16()), rtol=2e-2, atol=2e-2)


def test_bad_input_gives_clear_errors():
    layer, _, _ = make_layer()
    with pytest.raises((RuntimeError, ValueError), match="in_features"):
        layer(torch.randn(3, 47))
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        layer(torch.randn(3, 48, dtype=torch.float64))


def test_optimizer_keeps_masked_weights():
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(32, 24, 0.9, seed=1)[0], nn.ReLU(), make_layer(24, 4, 0.5, seed=2)[0])
    before = [m.weight.detach().clone() for m in model if isinstance(m, MaskedSparseLinear)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 4, (16,)))
        loss.backward()
        for m in model:
            if isinstance(m, MaskedSparseLinear):
                assert bool((m.weight.grad[~m.mask] == 0).all())
        opt.step()
    layers = [m for m in model if isinstance(m, MaskedSparseLinear)]
    for m, w0 in zip(layers, before):
        assert torch.equal(m.weight[~m.mask], w0[~m.mask])
        assert not torch.equal(m.weight[m.mask], w0[m.mask])


def test_concurrent_threads():
    layer, _, _ = make_layer(200, 200, 0.9)  # > 32768 weights: batch 1 takes the sparse path
    inputs = [torch.randn(b, 200) for b in (1, 3, 40)]
    wants = [reference(layer, x) for x in inputs]
    errors = []

    def worker(i):
        try:
            for j in range(30):
                if i == 0 and j % 10 == 0:
                    layer._clear_caches()  # force concurrent rebuilds
                k = (i + j) % len(inputs)
                with torch.no_grad():
                    y = layer(inputs[k])
                torch.testing.assert_close(y.double(), wants[k], rtol=1e-4, atol=1e-4)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(24, 16, 0.9, seed=3)[0], nn.ReLU(), make_layer(16, 5, 0.5, seed=4)[0])
    x = torch.randn(7, 24)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    grads = [m.weight.grad.clone() for m in model if isinstance(m, MaskedSparseLinear)]
    model.zero_grad()
    model(x).sum().backward()
    for g, m in zip(grads, [m for m in model if isinstance(m, MaskedSparseLinear)]):
        torch.testing.assert_close(g, m.weight.grad)
        assert bool((g[~m.mask] == 0).all())


def test_no_bias():
    layer, _, _ = make_layer(bias=False)
    assert layer.bias is None
    x = torch.randn(4, 48, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-4, atol=1e-4)


@cuda
def test_cuda_module():
    layer, _, mask = make_layer(sparsity=0.9)
    x = torch.randn(9, 48)
    want = reference(layer, x)
    layer = layer.cuda()
    y = layer(x.cuda())
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert bool((layer.weight.grad[~layer.mask] == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(layer(x[:1].cuda()).double().cpu(), want[:1], rtol=1e-4, atol=1e-4)
