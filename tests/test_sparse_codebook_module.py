"""CodebookLinear's sparse-codebook path, DeployedSparseCodebookLinear (deploy / load(deploy=True))
and to_sparse keeping pruned + shared layers (issue 13)."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.nn import CodebookLinear, DeployedSequential, DeployedSparseCodebookLinear, DeployedSparseLinear, force_path
from torchslim.nn.deployed import DeployedLayerError


def _layer(out_f=512, in_f=1024, density=0.1, k=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=dtype))
        lin.bias.copy_(torch.randn(out_f, generator=g, dtype=dtype))
    mask = torch.rand(out_f, in_f, generator=g) < density
    return CodebookLinear.from_dense(lin, k, mask=mask, max_iter=20)


def _ref(layer, x):
    """float64 reference: decode, then F.linear."""
    w = layer.effective_codebook().detach().double()[layer.labels().long()]
    b = None if layer.bias is None else layer.bias.detach().double()
    return F.linear(x.double(), w, b)


@pytest.mark.parametrize("shape", [(1, 1024), (7, 1024), (2, 3, 1024), (0, 1024), (40, 1024)])
def test_forward_matches_reference(shape):
    layer = _layer()
    x = torch.randn(*shape)
    y = layer(x)
    assert layer.last_path == "sparse_codebook"
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-4)
    assert y.shape == (*shape[:-1], 512)


def test_non_contiguous_input_and_odd_shape():
    layer = _layer(out_f=301, in_f=783, density=0.08, seed=3)
    x = torch.randn(783, 5).t()  # non-contiguous
    y = layer(x)
    assert layer.last_path == "sparse_codebook"
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-4)


def test_rule_density_and_batch():
    sparse = _layer(density=0.1)
    mid = _layer(density=0.3, seed=1)
    sparse(torch.randn(1, 1024))
    assert sparse.last_path == "sparse_codebook"
    mid(torch.randn(1, 1024))
    assert mid.last_path == "codebook"  # 0.3 > 0.15 at batch < 32
    mid(torch.randn(64, 1024))
    assert mid.last_path == "sparse_codebook"  # 0.3 <= 0.4 at batch >= 32
    dense = _layer(density=0.6, seed=2)
    dense(torch.randn(64, 1024))
    assert dense.last_path == "codebook"
    unpinned = CodebookLinear(64, 32, num_clusters=16)
    unpinned(torch.randn(2, 64))
    assert unpinned.last_path == "codebook"


def test_force_path_both_ways():
    sparse, dense = _layer(density=0.1), _layer(density=0.6, seed=2)
    x = torch.randn(4, 1024)
    with force_path("dense"):
        y_dense = sparse(x)
        assert sparse.last_path == "codebook"
    with force_path("sparse"):
        y_sparse = dense(x)
        assert dense.last_path == "sparse_codebook"
    torch.testing.assert_close(y_dense.double(), _ref(sparse, x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y_sparse.double(), _ref(dense, x), rtol=1e-5, atol=1e-4)


def test_gradients_match_reference_float64():
    layer = _layer(out_f=200, in_f=300, density=0.1, dtype=torch.float64)
    x = torch.randn(5, 300, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert layer.last_path == "sparse_codebook"
    g = torch.randn_like(y)
    y.backward(g)
    # reference: the decoded weight as a differentiable function of the codebook
    cb = layer.codebook.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    w = F.pad(cb[1:], (1, 0))[layer.labels().long()]
    F.linear(xr, w, b).backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    torch.testing.assert_close(layer.codebook.grad[1:], cb.grad[1:])
    assert layer.codebook.grad[0].item() == 0.0  # exactly: the pinned zero gets no gradient
    assert layer.codebook.grad[1:].abs().sum() > 0


def test_cache_rebuilt_after_indices_change():
    layer = _layer()
    x = torch.randn(3, 1024)
    layer(x)
    rp_before = layer.sparse_codes()[0]
    # prune one whole row more, in place (version counter changes)
    with torch.no_grad():
        layer.indices[5].zero_()
    y = layer(x)
    assert layer.last_path == "sparse_codebook"
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-4)
    rp = layer.sparse_codes()[0]
    assert rp is not rp_before and rp[6] == rp[5]
    # a new indices tensor (load_state_dict copies in place; assign a fresh one too)
    other = _layer(seed=7)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))


def test_threads_share_a_layer():
    layer = _layer()
    x = torch.randn(2, 1024)
    want = _ref(layer, x)
    out, errors = [], []

    def run():
        try:
            out.append(layer(x))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 4
    for y in out:
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


def test_inference_mode():
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(3, 1024)
        y = layer(x)
    assert layer.last_path == "sparse_codebook"
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-4)


def test_compile_fullgraph():
    layer = _layer()
    x = torch.randn(3, 1024)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        y = compiled(x)
    # under compile the layer runs the codebook kernel (documented): same values
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-4)


def test_pickle_and_deepcopy_drop_cache():
    import copy
    import pickle

    layer = _layer()
    x = torch.randn(2, 1024)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone(x), y)
        assert clone.last_path == "sparse_codebook"


# ----------------------------------------------------------------------------- deploy

def _mlp(density=0.08, k=16):
    torch.manual_seed(0)
    return nn.Sequential(_layer(300, 784, density, k, seed=1), nn.ReLU(), _layer(100, 300, density, k, seed=2),
                         nn.ReLU(), _layer(10, 100, 0.5, k, seed=3))


def _assert_compressed_only(layer):
    assert isinstance(layer, DeployedSparseCodebookLinear)
    n_full = layer.in_features * layer.out_features
    floats = {name: t.numel() for name, t in layer.named_buffers() if t is not None and t.dtype.is_floating_point}
    assert floats == {"codebook": layer.num_clusters, "bias": layer.out_features}
    assert n_full not in floats.values() and layer.nnz not in floats.values()
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == (layer.nnz + 1) // 2


def test_deploy_from_model():
    model = _mlp()
    x = torch.randn(6, 784)
    with torch.no_grad():
        want = model(x)
    dep = torchslim.deploy(model)
    assert type(dep) is DeployedSequential
    assert isinstance(dep[0], DeployedSparseCodebookLinear) and isinstance(dep[2], DeployedSparseCodebookLinear)
    assert not isinstance(dep[4], DeployedSparseCodebookLinear)  # density 0.5: a decoded form
    _assert_compressed_only(dep[0])
    with torch.inference_mode():
        got = dep(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-4)  # grad mode on, input without grad: module calls
    seen = []
    dep[0].register_forward_hook(lambda *a: seen.append(1))
    dep(x)
    assert seen  # in grad mode the layers are module calls (hooks run)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(DeployedLayerError):
        dep[0](x.requires_grad_(True))
    with pytest.raises(DeployedLayerError):
        dep[0].requires_grad_(True)
    with pytest.raises(DeployedLayerError):
        dep[0].weight
    with pytest.raises(ValueError, match="in_features"):
        dep[0](torch.randn(2, 783))
    torch.testing.assert_close(dep[0].to_dense().weight, model[0].weight.detach())


def test_deploy_compile_and_dtype():
    model = _mlp()
    x = torch.randn(4, 784)
    dep = torchslim.deploy(model)
    with torch.inference_mode():
        want = dep(x)
        compiled = torch.compile(dep, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), want)
    d64 = torchslim.deploy(model).to(torch.float64)
    assert d64[0].codebook.dtype == torch.float64 and d64[0].codes.dtype == torch.uint8
    with torch.inference_mode():
        got = d64(x.double())
    with torch.no_grad():
        ref = F.linear(F.relu(F.linear(F.relu(_ref(model[0], x)), model[2].weight.double(), model[2].bias.double())),
                       model[4].weight.double(), model[4].bias.double())
    torch.testing.assert_close(got, ref)


def test_deployed_sequential_mixes_fused_runs_and_sparse_codebook_layers():
    torch.manual_seed(0)
    from torchslim.nn import MaskedSparseLinear

    lin1 = MaskedSparseLinear.from_dense(nn.Linear(256, 128), mask=torch.rand(128, 256) < 0.1)
    lin2 = MaskedSparseLinear.from_dense(nn.Linear(128, 128), mask=torch.rand(128, 128) < 0.1)
    model = nn.Sequential(lin1, nn.ReLU(), lin2, nn.ReLU(), _layer(64, 128, 0.1, seed=4), nn.ReLU(),
                          MaskedSparseLinear.from_dense(nn.Linear(64, 10), mask=torch.rand(10, 64) < 0.2))
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = model(x)
    dep = torchslim.deploy(model)
    assert type(dep) is DeployedSequential
    assert isinstance(dep[4], DeployedSparseCodebookLinear) and isinstance(dep[0], DeployedSparseLinear)
    assert [r[:2] for r in dep._runs] == [(0, 4), (4, 6), (6, 7)]  # the sparse-codebook layer: a run of its own
    with torch.inference_mode():
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_skeleton", [False, True])
def test_deploy_from_file(tmp_path, with_skeleton):
    model = _mlp()
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    x = torch.randn(3, 784)
    with torch.no_grad():
        want = model(x)
    if with_skeleton:
        skeleton = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        dep = torchslim.load(path, model=skeleton, deploy=True)
    else:
        dep = torchslim.load(path, deploy=True)
    layers = [m for m in dep.modules() if isinstance(m, DeployedSparseCodebookLinear)]
    assert len(layers) == 2
    for m in layers:
        _assert_compressed_only(m)
    ref = torchslim.deploy(model)
    for a, b in zip(layers, [ref[0], ref[2]]):
        assert torch.equal(a.row_ptr, b.row_ptr) and torch.equal(a.col_idx, b.col_idx)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)
    with torch.inference_mode():
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-4)


def test_deploy_8bit_codes_and_empty_rows():
    layer = _layer(64, 200, 0.05, k=40, seed=5)
    with torch.no_grad():
        layer.indices[:3].zero_()  # rows with no kept weight
    dep = torchslim.deploy(layer)
    assert isinstance(dep, DeployedSparseCodebookLinear)
    assert dep.codes.numel() == dep.nnz  # one byte per code above 16 clusters
    x = torch.randn(4, 200)
    with torch.inference_mode():
        torch.testing.assert_close(dep(x).double(), _ref(layer, x), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- to_sparse

def test_to_sparse_keeps_sparse_codebook_layers():
    from torchslim.nn import MaskedSparseLinear

    model = _mlp()
    sp = torchslim.to_sparse(model)
    assert isinstance(sp[0], CodebookLinear) and isinstance(sp[2], CodebookLinear)
    assert isinstance(sp[4], MaskedSparseLinear)  # density 0.5: decoded
    x = torch.randn(2, 784)
    with torch.no_grad():
        torch.testing.assert_close(sp(x), model(x), rtol=1e-5, atol=1e-4)
    assert sp[0].last_path == "sparse_codebook"
    assert sp[0].codebook is not model[0].codebook  # a copy


def test_save_deployed_and_load_back(tmp_path):
    model = _mlp()
    dep = torchslim.deploy(model)
    path = tmp_path / "dep.safetensors"
    torchslim.save(dep, path)
    x = torch.randn(3, 784)
    with torch.inference_mode():
        want = dep(x)
    for deploy in (False, True):
        back = torchslim.load(path, deploy=deploy)
        assert isinstance(back[0], DeployedSparseCodebookLinear) and isinstance(back[2], DeployedSparseCodebookLinear)
        assert torch.equal(back[0].codes, dep[0].codes) and torch.equal(back[0].col_idx, dep[0].col_idx)
        with torch.inference_mode():
            torch.testing.assert_close(back(x), want)


def test_save_refuses_nonzero_pinned_code():
    layer = torchslim.deploy(_layer(32, 64, 0.1, seed=6))
    with torch.no_grad():
        layer.codebook[0] = 1.0
    with pytest.raises(ValueError, match="codebook\\[0\\]"):
        torchslim.save(layer, "/tmp/unused_sck.safetensors")


def test_save_drops_kept_entries_of_the_pinned_code(tmp_path):
    # a hand-built layer: row 0 keeps columns 3 (code 0 = the zero) and 1 (code 2), unordered
    row_ptr = torch.tensor([0, 2, 3], dtype=torch.int32)
    col_idx = torch.tensor([3, 1, 0], dtype=torch.int16)
    codes = torch.tensor([0 | (2 << 4), 1], dtype=torch.uint8)
    codebook = torch.tensor([0.0, 0.5, -1.5, 2.0])
    layer = DeployedSparseCodebookLinear(4, 2, row_ptr, col_idx, codes, codebook, torch.tensor([0.25, -0.5]))
    x = torch.randn(3, 4, dtype=torch.float64).float()
    want = x @ torch.tensor([[0.0, -1.5, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]).t() + torch.tensor([0.25, -0.5])
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want)
    path = tmp_path / "one.safetensors"
    torchslim.save(nn.Sequential(layer), path)
    back = torchslim.load(path)[0]
    assert isinstance(back, DeployedSparseCodebookLinear) and back.nnz == 2
    assert back.col_idx.tolist() == [1, 0]
    with torch.inference_mode():
        torch.testing.assert_close(back(x), want)


def test_pipeline_deploy_row_reports_the_deployed_model(tmp_path):
    import numpy as np

    from torchslim.pipeline import PipelineConfig, run_pipeline

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int64) + 2 * (x[:, 3] > 0)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    payload = run_pipeline(PipelineConfig(data=str(tmp_path / "d.npz"), hidden=(256,), epochs=1, prune_epochs=1,
                                          share_epochs=1, sparsity=0.95, bits=4, out=str(tmp_path / "o"),
                                          progress=False, verbose=False, latency=False))
    st = {s["name"]: s for s in payload["stages"]}
    dep = st["deploy"]
    assert "DeployedSparseCodebookLinear" in dep["deploy_forms"]
    assert dep["bytes"] == st["shared"]["bytes"] and 0 < dep["weight_bytes"]
    assert "B of weights running" in dep["note"]
    assert payload["summary"]["reload_matches"] is True


def test_double_backward_on_the_sparse_path():
    from torch.func import functional_call

    layer = _layer(out_f=6, in_f=9, density=0.4, k=8, seed=8, dtype=torch.float64)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    cb = layer.codebook.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def f(x, c, b):
        return functional_call(layer, {"codebook": c, "bias": b}, (x,))
    with force_path("sparse"):
        f(x, cb, b)
        assert layer.last_path == "sparse_codebook"
        assert torch.autograd.gradcheck(f, (x, cb, b))
        assert torch.autograd.gradgradcheck(f, (x, cb, b))
        # the input-gradient penalty reaches the codebook (second order), as on the codebook path
        g, = torch.autograd.grad(f(x, cb, b).pow(2).sum(), x, create_graph=True)
        got, = torch.autograd.grad(g.pow(2).sum(), cb)
    with force_path("dense"):
        g, = torch.autograd.grad(f(x, cb, b).pow(2).sum(), x, create_graph=True)
        want, = torch.autograd.grad(g.pow(2).sum(), cb)
        assert layer.last_path == "codebook"
    torch.testing.assert_close(got, want)
    assert got[1:].abs().sum() > 0 and got[0] == 0
