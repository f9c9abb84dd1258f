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


# --------------------------------------------------------------------------- state dicts


def _state_bytes(sd):
    return sum(t.numel() * t.element_size() for t in sd.values())


def test_set_mask_and_from_dense_zero_the_masked_weights():
    layer, lin, mask = make_layer(sparsity=0.7)
    assert bool((layer.weight[~mask] == 0).all()) and torch.equal(layer.weight[mask], lin.weight[mask])
    new = torch.rand(40, 48) < 0.2
    layer.set_mask(new)
    assert bool((layer.weight[~new] == 0).all())
    both = new & mask  # (positions masked before stay at the zero they were set to)
    assert torch.equal(layer.weight.detach()[both], lin.weight.detach()[both]) and int(both.sum()) > 0


def test_state_dict_has_exact_zeros_after_adam_drift():
    """Adam moments built before a mask change keep moving the newly masked weights; the
    state_dict still holds exact zeros there, so a plain nn.Linear loaded from it (a route
    that drops the mask) computes the pruned function."""
    torch.manual_seed(0)
    layer, _, _ = make_layer(sparsity=0.3)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 48)
    for step in range(4):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
        if step == 1:
            layer.set_mask(layer.mask & (torch.rand(40, 48) < 0.5))
    assert int((layer.weight[~layer.mask] != 0).sum()) > 100, "the test needs drift at masked positions"
    sd = layer.state_dict()
    assert bool((sd["weight"][~layer.mask] == 0).all())
    torch.testing.assert_close(sd["weight"][layer.mask], layer.weight.detach()[layer.mask])
    plain = nn.Linear(48, 40)
    plain.load_state_dict({"weight": sd["weight"], "bias": sd["bias"]})
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x))
    # keep_vars: the Parameter itself when nothing drifted.
    clean, _, _ = make_layer(sparsity=0.5)
    assert clean.state_dict(keep_vars=True)["weight"] is clean.weight


def test_state_dict_size_is_dense_plus_mask_bits():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(301, 97), nn.ReLU(), nn.Linear(97, 13))
    pruned = nn.Sequential(MaskedSparseLinear.from_dense(dense[0], torch.rand(97, 301) < 0.1), nn.ReLU(),
                           MaskedSparseLinear.from_dense(dense[2], torch.rand(13, 97) < 0.1))
    mask_bits = 97 * ((301 + 7) // 8) + 13 * ((97 + 7) // 8)
    assert _state_bytes(pruned.state_dict()) == _state_bytes(dense.state_dict()) + mask_bits
    buf_dense, buf_pruned = io.BytesIO(), io.BytesIO()
    torch.save(dense.state_dict(), buf_dense)
    torch.save(pruned.state_dict(), buf_pruned)
    # (torch.save adds a few hundred bytes of record names for the extra keys)
    assert len(buf_pruned.getvalue()) <= len(buf_dense.getvalue()) + mask_bits + 1024


@pytest.mark.parametrize("in_f", [1, 7, 8, 9, 13, 64, 65])
def test_mask_bits_round_trip(in_f):
    from torchslim.nn.masked_sparse_linear import pack_mask_bits, unpack_mask_bits

    mask = torch.rand(5, in_f, generator=torch.Generator().manual_seed(in_f)) < 0.5
    packed = pack_mask_bits(mask)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, (in_f + 7) // 8)
    assert torch.equal(unpack_mask_bits(packed, 5, in_f), mask)
    # Bit j % 8 of byte j // 8, least significant first (numpy's bitorder="little").
    np = pytest.importorskip("numpy")
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1, bitorder="little"))
    assert tuple(unpack_mask_bits(pack_mask_bits(torch.ones(0, in_f, dtype=torch.bool)), 0, in_f).shape) == (0, in_f)


@pytest.mark.parametrize("form", ["packed", "bool"])
def test_load_state_dict_accepts_packed_and_bool_masks(form):
    src, _, _ = make_layer(sparsity=0.8, seed=1)
    sd = src.state_dict()
    if form == "bool":  # an old checkpoint
        sd["mask"] = src.mask.clone()
    layer, _, _ = make_layer(sparsity=0.2, seed=2)
    x = torch.randn(3, 48)
    layer(x)  # warm the caches of the old state
    layer.load_state_dict(sd)
    assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, src.mask)
    torch.testing.assert_close(layer(x), src(x))
    assert layer.density == pytest.approx(src.density)


def test_load_state_dict_zeroes_masked_weights_of_old_checkpoints():
    src, _, _ = make_layer(sparsity=0.8, seed=1)
    sd = {"weight": torch.randn(40, 48), "bias": src.bias.detach().clone(), "mask": src.mask.clone()}
    layer = MaskedSparseLinear(48, 40)
    layer.load_state_dict(sd)
    assert bool((layer.weight[~src.mask] == 0).all())
    torch.testing.assert_close(layer.weight[src.mask], sd["weight"][src.mask])


def test_load_state_dict_rejects_bad_masks():
    layer, _, _ = make_layer()
    sd = layer.state_dict()
    for bad in (torch.zeros(40, 7, dtype=torch.uint8), torch.zeros(40, 6, dtype=torch.int64),
                torch.zeros(48, 40, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match="mask"):
            layer.load_state_dict({**sd, "mask": bad})
    padded = MaskedSparseLinear(13, 4)
    bits = padded.state_dict()["mask"].clone()
    bits[0, 1] |= 0x80  # column 15 does not exist
    with pytest.raises(RuntimeError, match="padding bits"):
        padded.load_state_dict({**padded.state_dict(), "mask": bits})


def test_state_dict_into_meta_skeleton_with_assign():
    src, _, _ = make_layer(sparsity=0.9)
    with torch.device("meta"):
        layer = MaskedSparseLinear(48, 40)
    layer.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(4, 48)
    torch.testing.assert_close(layer(x), src(x))
    assert layer.mask.dtype == torch.bool


# --------------------------------------------------------------------------- takeover


def _conv1d(in_f, out_f, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    del transformers
    torch.manual_seed(seed)
    conv = Conv1D(out_f, in_f)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv


def test_from_dense_conv1d():
    conv = _conv1d(48, 40)
    with torch.no_grad():
        conv.weight[conv.weight.abs() < 0.5] = 0
    layer = MaskedSparseLinear.from_dense(conv)
    assert layer.weight.shape == (40, 48) and layer.weight.is_contiguous()
    assert torch.equal(layer.mask, conv.weight.t() != 0)
    x = torch.randn(2, 3, 48)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    mask = torch.rand(40, 48) < 0.3
    masked = MaskedSparseLinear.from_dense(conv, mask)
    torch.testing.assert_close(masked(x).double(), F.linear(x.double(), (conv.weight.t() * mask).double(),
                                                            conv.bias.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_dense_torch_pruned_parametrized_and_removed(kind):
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer_in = nn.Linear(48, 40) if kind == "linear" else _conv1d(48, 40)
    prune.l1_unstructured(layer_in, "weight", amount=0.8)
    torch_mask = layer_in.weight_mask != 0
    if kind == "conv1d":
        torch_mask = torch_mask.t()
    x = torch.randn(5, 48)
    want = layer_in(x).detach()
    taken = MaskedSparseLinear.from_dense(layer_in)
    assert torch.equal(taken.mask, torch_mask)
    assert taken.density == pytest.approx(0.2, abs=0.01)
    torch.testing.assert_close(taken(x), want, rtol=1e-5, atol=1e-5)
    # A stale module.weight (weight_orig edited after the last forward) is not what is read.
    with torch.no_grad():
        layer_in.weight_orig.mul_(2)
    torch.testing.assert_close(MaskedSparseLinear.from_dense(layer_in)(x), 2 * (want - layer_in.bias) + layer_in.bias,
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer_in.weight_orig.div_(2)
    # The mask intersects with a given one.
    extra = torch.rand(40, 48) < 0.5
    assert torch.equal(MaskedSparseLinear.from_dense(layer_in, extra).mask, torch_mask & extra)
    # After prune.remove: a plain layer whose zeros are the pruning.
    prune.remove(layer_in, "weight")
    removed = MaskedSparseLinear.from_dense(layer_in)
    assert torch.equal(removed.mask, torch_mask)
    torch.testing.assert_close(removed(x), want, rtol=1e-5, atol=1e-5)


def test_from_dense_masked_sparse_linear_and_bad_types():
    layer, _, mask = make_layer(sparsity=0.5)
    twin = MaskedSparseLinear.from_dense(layer)
    assert torch.equal(twin.mask, mask) and twin.weight is not layer.weight
    x = torch.randn(3, 48)
    torch.testing.assert_close(twin(x), layer(x))
    for bad in (nn.Conv2d(1, 1, 1), nn.Embedding(3, 4), torch.randn(3, 4)):
        with pytest.raises(TypeError, match="nn.Linear"):
            MaskedSparseLinear.from_dense(bad)
    with pytest.raises(ValueError, match="shape"):
        MaskedSparseLinear.from_dense(nn.Linear(48, 40), torch.ones(48, 40, dtype=torch.bool))


def test_from_dense_leaves_the_rng_alone():
    lin = nn.Linear(48, 40)
    torch.manual_seed(123)
    MaskedSparseLinear.from_dense(lin, torch.rand(40, 48) < 0.5)
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(40, 48)
    torch.testing.assert_close(after, torch.rand(3))


# --------------------------------------------------------------------------- forced paths, devices


def test_force_path_context_and_setter():
    from torchslim.nn import force_path, forced_path

    small, _, _ = make_layer(sparsity=0.5)  # the rule: dense at every batch
    big, _, _ = make_layer(400, 100, sparsity=0.9)  # the rule: sparse
    x_small, x_big = torch.randn(1, 48), torch.randn(1, 400)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert forced_path() is None
            with force_path("sparse"):
                assert forced_path() == "sparse"
                torch.testing.assert_close(small(x_small).double(), reference(small, x_small), rtol=1e-5, atol=1e-5)
                assert small.last_path == "sparse"
                with force_path("dense"):
                    torch.testing.assert_close(big(x_big).double(), reference(big, x_big), rtol=1e-5, atol=1e-5)
                    assert big.last_path == "dense"
                big(x_big)
                assert big.last_path == "sparse" and forced_path() == "sparse"
            small(x_small)
            assert small.last_path == "dense" and forced_path() is None
    force_path("sparse")  # plain setter (a pytest fixture's form)
    try:
        small(x_small)
        assert small.last_path == "sparse"
    finally:
        force_path(None)
    small(x_small)
    assert small.last_path == "dense"
    with pytest.raises(ValueError, match="sparse"):
        force_path("fast")
    assert forced_path() is None


def test_forced_sparse_training_gives_exact_zero_grads():
    from torchslim.nn import force_path

    layer, _, mask = make_layer(sparsity=0.3)  # dense by the rule in training
    x = torch.randn(5, 48, requires_grad=True)
    with force_path("sparse"):
        layer(x).square().sum().backward()
        assert layer.last_path == "sparse"
    assert bool((layer.weight.grad[~mask] == 0).all()) and float(layer.weight.grad.abs().max()) > 0
    xr = x.detach().requires_grad_()
    wr = layer.weight.detach().clone().requires_grad_()
    F.linear(xr, wr * mask, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, wr.grad * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", [None, "sparse", "dense"])
@pytest.mark.parametrize("grad", [False, True])
def test_meta_input_to_cpu_layer_raises_like_linear(path, grad):
    from torchslim.nn import force_path

    layer, _, _ = make_layer(400, 100, sparsity=0.9)
    x = torch.randn(2, 400, device="meta", requires_grad=grad)
    with pytest.raises(RuntimeError):
        nn.Linear(400, 100)(x)
    with force_path(path), pytest.raises((RuntimeError, ValueError), match="device"):
        layer(x)


@pytest.mark.parametrize("in_f,out_f", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("path", [None, "sparse", "dense"])
def test_empty_layers_match_linear(in_f, out_f, path):
    """0-wide layers (the sparse kernels need both dimensions) run dense, like nn.Linear."""
    from torchslim.nn import force_path

    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.bias.normal_()
    layer = MaskedSparseLinear.from_dense(lin)
    x = torch.randn(3, in_f, requires_grad=True)
    with force_path(path):
        y = layer(x)
        torch.testing.assert_close(y, lin(x))
        y.sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), lin(x))
    assert x.grad.shape == x.shape and layer.bias.grad.shape == (out_f,)
    other = MaskedSparseLinear(in_f, out_f)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), lin(x))
