"""1-D k-means and torchslim.share.cluster_weights (layer and global codebooks)."""
import copy
import pickle
import time

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.kmeans import INITS, _initial_centroids, assign, kmeans_1d
from torchslim.nn import CodebookLinear, MaskedSparseLinear
from torchslim.ops._reference import unpack_int4
from torchslim.share import cluster_weights, sharing_report


def _labels(layer):
    idx = layer.indices
    if idx.shape[1] != layer.in_features:
        idx = unpack_int4(idx, layer.in_features)
    return idx.long()


def _values(n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a bimodal, skewed sample like trained weights
    return torch.cat([torch.randn(n // 2, generator=g) * 0.05, torch.randn(n - n // 2, generator=g) * 0.02 + 0.1])


# ---- k-means -------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
def test_kmeans_is_a_lloyd_fixed_point(init):
    v = _values()
    r = kmeans_1d(v, 12, init=init, seed=3, max_iter=2000)
    c = r.centroids
    assert c.dtype == torch.float64 and c.shape == (12,)
    assert torch.all(c[1:] >= c[:-1])
    assert r.labels.shape == v.shape and r.labels.dtype == torch.int64
    vd = v.double()
    # every value is labelled with its nearest centroid ...
    dist = (vd.unsqueeze(1) - c).abs()
    chosen = dist.gather(1, r.labels.unsqueeze(1)).squeeze(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-12)
    # ... and, once converged, every centroid is the mean of its values
    assert r.converged
    for k in range(12):
        sel = vd[r.labels == k]
        assert sel.numel() > 0, "no cluster may stay empty while values are distinct"
        assert float(c[k]) == pytest.approx(float(sel.mean()), abs=1e-12)
    sse = float(((vd - c[r.labels]) ** 2).sum())
    assert r.inertia == pytest.approx(sse, rel=1e-6)


@pytest.mark.parametrize("init", INITS)
def test_kmeans_deterministic_per_seed(init):
    v = _values(seed=1)
    a = kmeans_1d(v, 10, init=init, seed=7, max_iter=5)
    b = kmeans_1d(v.clone(), 10, init=init, seed=7, max_iter=5)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    if init in ("random", "kmeans++"):
        # the seed really drives the initialisation
        x = np.sort(v.numpy())
        assert not np.array_equal(_initial_centroids(x, 10, init, 0), _initial_centroids(x, 10, init, 1))


def test_initialisations():
    v = _values(seed=2)
    x = np.sort(v.numpy())
    lin = _initial_centroids(x, 5, "linear", 0)
    np.testing.assert_allclose(lin, np.linspace(float(x[0]), float(x[-1]), 5), rtol=1e-12)
    dens = _initial_centroids(x, 4, "density", 0)
    np.testing.assert_allclose(dens, x[[625, 1875, 3125, 4375]])  # CDF at 1/8, 3/8, 5/8, 7/8
    for init in ("random", "kmeans++"):
        c = _initial_centroids(x, 6, init, 0)
        assert c.shape == (6,) and np.isin(c.astype(np.float32), x).all()  # data points


@pytest.mark.parametrize("init", INITS)
def test_reconstruction_error_decreases_with_k(init):
    v = _values(n=20000, seed=4)
    errs = []
    for k in (2, 4, 8, 16, 32, 64):
        r = kmeans_1d(v, k, init=init, seed=0)
        errs.append(float((r.centroids[r.labels] - v.double()).norm() / v.double().norm()))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.03


def test_linear_init_fits_a_gaussian_near_optimum():
    # 16 clusters of a Gaussian: the Lloyd-Max optimum has relative error ~0.0975
    v = torch.randn(50000, generator=torch.Generator().manual_seed(0))
    r = kmeans_1d(v, 16, init="linear")
    rel = float((r.centroids[r.labels] - v.double()).norm() / v.double().norm())
    assert rel < 0.105


def test_kmeans_fewer_distinct_values_than_k():
    v = torch.tensor([[0.5, -1.0, 0.5], [2.0, -1.0, 2.0]])
    r = kmeans_1d(v, 8)
    assert r.centroids.shape == (8,) and r.inertia == 0.0
    assert r.labels.shape == (2, 3)
    torch.testing.assert_close(r.centroids[r.labels], v.double(), rtol=0, atol=0)
    const = kmeans_1d(torch.full((100,), 0.25), 16, init="kmeans++")
    assert torch.all(const.centroids == 0.25) and torch.all(const.labels == const.labels[0])
    single = kmeans_1d(torch.tensor([3.0]), 1)
    assert float(single.centroids[0]) == 3.0


def test_kmeans_few_distinct_values_with_many_copies():
    v = torch.tensor([0.0] * 50 + [1.0] * 50 + [5.0] * 3 + [9.0] * 10)
    r = kmeans_1d(v, 3, init="random", seed=2)
    assert r.inertia == pytest.approx(float(((v.double() - r.centroids[r.labels]) ** 2).sum()))
    assert int(torch.unique(r.labels).numel()) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kmeans_rejects_non_finite(bad):
    v = torch.randn(10)
    v[3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans_1d(v, 4)


def test_kmeans_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(torch.empty(0), 4)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans_1d(torch.randn(10), 0)
    with pytest.raises(ValueError, match="init"):
        kmeans_1d(torch.randn(10), 2, init="uniform")
    with pytest.raises(TypeError):
        kmeans_1d([1.0, 2.0], 2)


def test_assign_matches_labels():
    v = _values(seed=5)
    r = kmeans_1d(v, 9)
    assert torch.equal(assign(v, r.centroids), r.labels)


@pytest.mark.slow
def test_kmeans_10m_weights_time():
    """Prints the time to cluster 10M weights (not asserted: machines differ)."""
    w = torch.randn(10_000_000, generator=torch.Generator().manual_seed(0)) * 0.05
    t0 = time.perf_counter()
    r = kmeans_1d(w, 16, init="linear")
    dt = time.perf_counter() - t0
    print(f"\nkmeans_1d: 10M weights, K=16: {dt:.2f} s on {torch.get_num_threads()} threads "
          f"({r.iterations} Lloyd steps, inertia {r.inertia:.4g})")
    assert r.labels.shape == w.shape and r.centroids.shape == (16,)


# ---- cluster_weights ------------------------------------------------------------------------------
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5))


def _pruned_mlp(seed=0, density=0.4):
    model = _mlp(seed)
    for i in (0, 2, 4):
        lin = model[i]
        mask = torch.rand(lin.out_features, lin.in_features) < density
        model[i] = MaskedSparseLinear.from_dense(lin, mask)
    return model


def _dense_weights(model):
    out = []
    for m in model:
        if isinstance(m, MaskedSparseLinear):
            out.append((m.weight * m.mask).detach().clone())
        elif isinstance(m, nn.Linear):
            out.append(m.weight.detach().clone())
    return out


@pytest.mark.parametrize("k", [4, 16, 64])
def test_cluster_weights_layer_scope_in_place(k):
    model = _mlp()
    before = _dense_weights(model)
    out = cluster_weights(model, num_clusters=k)
    assert out is model
    layers = [m for m in model if isinstance(m, CodebookLinear)]
    assert len(layers) == 3 and not any(isinstance(m, nn.Linear) for m in model)
    assert len({id(m.codebook) for m in layers}) == 3
    for layer, w in zip(layers, before):
        assert layer.num_clusters == k and not layer.zero_pinned
        torch.testing.assert_close(layer.codebook.detach().double(), kmeans_1d(w, k).centroids)
        rel = float((layer.weight.detach() - w).norm() / w.norm())
        assert layer.reconstruction_error == pytest.approx(rel, rel=1e-4)
    x = torch.randn(7, 20)
    assert model(x).shape == (7, 5)


def test_cluster_weights_root_linear_and_include():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3)
    out = cluster_weights(lin, num_clusters=4)
    assert isinstance(out, CodebookLinear) and out.num_clusters == 4
    model = _mlp()
    cluster_weights(model, num_clusters=8, include=["2"])
    assert isinstance(model[2], CodebookLinear)
    assert type(model[0]) is nn.Linear and type(model[4]) is nn.Linear
    cluster_weights(model, num_clusters=8, include="0")
    assert isinstance(model[0], CodebookLinear) and type(model[4]) is nn.Linear


def test_cluster_weights_nested_and_attention_out_proj():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x, _ = self.attn(x, x, x)
            return self.head(self.block(x))

    net = Net()
    cluster_weights(net, num_clusters=16)
    assert isinstance(net.block[0], CodebookLinear) and isinstance(net.head, CodebookLinear)
    assert type(net.attn.out_proj) is not CodebookLinear
    assert net(torch.randn(2, 4, 8)).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        cluster_weights(Net(), include=["attn.out_proj"])


def test_cluster_weights_bad_arguments():
    for kwargs, match in [({"num_clusters": 0}, "num_clusters"), ({"num_clusters": 300}, "num_clusters"),
                          ({"scope": "model"}, "scope"), ({"init": "uniform"}, "init"),
                          ({"include": ["9"]}, "no module named .9."), ({"include": ["1"]}, "ReLU"),
                          ({"include": []}, "empty")]:
        with pytest.raises(ValueError, match=match):
            cluster_weights(_mlp(), **kwargs)
    with pytest.raises(ValueError, match="no nn.Linear"):
        cluster_weights(nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1)))
    mixed = _mlp()
    mixed[4] = mixed[4].double()
    with pytest.raises(ValueError, match="dtype"):
        cluster_weights(mixed, scope="global")


def test_cluster_weights_leaves_converted_layers_alone():
    model = cluster_weights(_mlp(), num_clusters=8)
    codebooks = [m.codebook for m in model if isinstance(m, CodebookLinear)]
    with pytest.raises(ValueError, match="no nn.Linear"):
        cluster_weights(model, num_clusters=4)
    assert [m.codebook for m in model if isinstance(m, CodebookLinear)] == codebooks


def test_global_scope_shares_one_parameter():
    model = _mlp(1)
    before = _dense_weights(model)
    cluster_weights(model, num_clusters=32, scope="global", init="density")
    layers = [m for m in model if isinstance(m, CodebookLinear)]
    shared = layers[0].codebook
    assert all(m.codebook is shared for m in layers)
    params = list(model.parameters())
    assert sum(p is shared for p in params) == 1
    assert len(params) == 1 + 3  # the codebook and three biases
    # the codebook is k-means of all layers' weights together
    allw = torch.cat([w.reshape(-1) for w in before])
    torch.testing.assert_close(shared.detach().double(), kmeans_1d(allw, 32, init="density").centroids)
    report = sharing_report(model)
    assert all(l.shared_codebook for l in report.layers)

    # its gradient is the sum over the layers of each layer's scatter-sum
    x = torch.randn(9, 20)
    model(x).square().sum().backward()
    dense = []
    h = x
    for m in model:
        if isinstance(m, CodebookLinear):
            w = m.weight.detach().clone().requires_grad_(True)
            dense.append((m, w))
            h = torch.nn.functional.linear(h, w, m.bias.detach())
        else:
            h = m(h)
    h.square().sum().backward()
    expected = torch.zeros(32)
    for m, w in dense:
        expected.scatter_add_(0, _labels(m).reshape(-1), w.grad.reshape(-1))
    torch.testing.assert_close(shared.grad, expected, rtol=1e-4, atol=1e-5)

    # one optimizer step moves every layer's decoded weights
    decoded = [m.weight.detach().clone() for m in layers]
    torch.optim.SGD([shared], lr=0.1).step()
    for m, w0 in zip(layers, decoded):
        assert not torch.equal(m.weight.detach(), w0)


def test_global_scope_copies_keep_sharing():
    model = cluster_weights(_pruned_mlp(2), num_clusters=16, scope="global")
    x = torch.randn(3, 20)
    for dup in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in dup if isinstance(m, CodebookLinear)]
        assert all(m.codebook is layers[0].codebook for m in layers)
        assert layers[0].codebook is not model[0].codebook
        assert len(list(dup.parameters())) == 4
        torch.testing.assert_close(dup(x), model(x), rtol=0, atol=0)
    sd = model.state_dict()
    assert {"0.codebook", "2.codebook", "4.codebook"} <= set(sd)
    fresh = cluster_weights(_pruned_mlp(5), num_clusters=16, scope="global")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_model_keeps_zeros_through_finetuning(scope):
    model = _pruned_mlp(3)
    masks = [m.mask.clone() for m in model if isinstance(m, MaskedSparseLinear)]
    kept = torch.cat([(m.weight.detach()[m.mask]) for m in model if isinstance(m, MaskedSparseLinear)])
    cluster_weights(model, num_clusters=16, scope=scope)
    layers = [m for m in model if isinstance(m, CodebookLinear)]
    assert all(m.zero_pinned for m in layers)
    if scope == "global":
        # zero is not a trainable centroid: the other 15 fit the kept weights only
        torch.testing.assert_close(layers[0].codebook.detach()[1:].double(), kmeans_1d(kept, 15).centroids)
    for m, mask in zip(layers, masks):
        assert torch.equal(_labels(m) == 0, ~mask)
    for opt_cls, kw in [(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05}),
                        (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.05})]:
        opt = opt_cls(model.parameters(), **kw)
        for _ in range(4):
            opt.zero_grad()
            loss = (model(torch.randn(16, 20)) - torch.randn(16, 5)).square().mean()
            loss.backward()
            opt.step()
        for m, mask in zip(layers, masks):
            assert float(m.codebook.detach()[0]) == 0.0
            assert torch.all(m.weight.detach()[~mask] == 0)
            assert torch.all(m.to_dense().weight.detach()[~mask] == 0)


def test_global_scope_mixed_pruned_and_dense_layers():
    model = _mlp(4)
    mask = torch.rand(24, 32) > 0.5
    model[2] = MaskedSparseLinear.from_dense(model[2], mask)
    cluster_weights(model, num_clusters=8, scope="global")
    layers = [m for m in model if isinstance(m, CodebookLinear)]
    assert all(m.zero_pinned for m in layers)
    assert float(layers[0].codebook.detach()[0]) == 0.0
    assert torch.all(_labels(layers[0]) > 0)  # dense layers use the 7 fitted centroids
    assert torch.equal(_labels(layers[1]) == 0, ~mask)


def test_sharing_report():
    model = cluster_weights(_pruned_mlp(6), num_clusters=16)
    report = sharing_report(model)
    assert [l.name for l in report.layers] == ["0", "2", "4"]
    l0 = report.layers[0]
    assert (l0.num_clusters, l0.bits, l0.zero_pinned, l0.shared_codebook) == (16, 4, True, False)
    assert l0.bytes_before == (32 * 20 + 32) * 4
    assert l0.bytes_after == 32 * 10 + 16 * 4 + 32 * 4
    assert 0 < l0.reconstruction_error < 0.2
    assert report.bytes_before == sum(l.bytes_before for l in report.layers)
    assert report.bytes_after == sum(l.bytes_after for l in report.layers)
    md = report.to_markdown()
    assert "| 0 | 32x20 | 16 | 4 |" in md and "total" in md
    d = report.to_dict()
    assert d["compression_ratio"] == pytest.approx(report.bytes_before / report.bytes_after)

    glob = sharing_report(cluster_weights(_mlp(6), num_clusters=200, scope="global"))
    assert all(l.bits == 8 and l.shared_codebook for l in glob.layers)
    # the shared codebook counts once in the total
    assert glob.bytes_after == sum(l.bytes_after for l in glob.layers) - 2 * 200 * 4


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cluster_weights_reproducible_per_seed(init, scope):
    a = cluster_weights(_pruned_mlp(7), num_clusters=8, scope=scope, init=init, seed=11)
    b = cluster_weights(_pruned_mlp(7), num_clusters=8, scope=scope, init=init, seed=11)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x = torch.randn(4, 20)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
