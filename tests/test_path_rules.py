"""The path rules (torchslim._path_rules): one rule per op, followed by every caller."""
import pytest
import torch
from torch import nn

import torchslim
from torchslim import _path_rules as rules
from torchslim.nn import (CodebookLinear, DeployedSequential, DeployedSparseCodebookLinear, DeployedSparseLinear,
                          MaskedSparseLinear)


def test_masked_rule_cases():
    # The crossovers of csrc/ops/path_rules.h, read back through the extension.
    f = rules.masked_sparse_faster
    small, mid, large = 32768, 1 << 20, 8 << 20  # weights: below the batch-1 dense limit, in cache, past 16 MB
    assert not f(0.01, 1, small) and f(0.01, 1, small + 1)
    assert f(0.25, 1, mid) and not f(0.26, 1, mid)
    assert f(0.45, 1, large) and not f(0.46, 1, large)
    assert f(0.4, 2, small) and not f(0.41, 2, mid)
    assert f(0.35, 64, mid, True) and not f(0.36, 64, mid, True)
    assert f(0.2, 63, mid, True) and not f(0.21, 63, mid, True)
    assert f(0.2, 8, mid, low_precision=True) and not f(0.21, 8, mid, low_precision=True)
    assert f(0.25, 1, mid, low_precision=True)  # batch 1 reads memory: the same rule as fp32
    assert rules.SMALL_WEIGHT_NUMEL == small and rules.TRAIN_MIN_BATCH == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_layers_take_their_rule(dtype):
    # At density 0.3 and batch 8 a float32 layer runs sparse, a bfloat16 one dense (its dense
    # product runs bf16 dot products, the sparse kernel fp32 ones).
    torch.manual_seed(1)
    layer = MaskedSparseLinear.from_dense(nn.Linear(400, 300), mask=torch.rand(300, 400) < 0.3).to(dtype)
    x = torch.randn(8, 400, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    assert layer.last_path == ("sparse" if dtype == torch.float32 else "dense")
    ref = nn.functional.linear(x.double(), (layer.weight * layer.mask).double(), layer.bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=5e-2)


@pytest.mark.parametrize("density", [0.1, 0.22, 0.3, 0.38, 0.5])
@pytest.mark.parametrize("shape", [(100, 200), (300, 400)])
def test_module_follows_the_rule(density, shape):
    torch.manual_seed(0)
    out_f, in_f = shape
    layer = MaskedSparseLinear.from_dense(nn.Linear(in_f, out_f), mask=torch.rand(out_f, in_f) < density)
    d, n = layer.density, out_f * in_f
    cases = [(torch.randn(1, in_f), False, rules.masked_sparse_faster(d, 1, n)),
             (torch.randn(8, in_f), False, rules.masked_sparse_faster(d, 8, n)),
             (torch.randn(8, in_f), True, rules.masked_sparse_faster(d, 8, n, training=True)),
             (torch.randn(64, in_f), True, rules.masked_sparse_faster(d, 64, n, training=True))]
    for x, grad, sparse in cases:
        with torch.set_grad_enabled(grad):
            y = layer(x)
        assert layer.last_path == ("sparse" if sparse else "dense"), (d, x.shape, grad)
        torch.testing.assert_close(y, nn.functional.linear(x, layer.weight * layer.mask, layer.bias))


def _pruned_shared_mlp(sizes, densities, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        keep = torch.rand(b, a) < densities[i]
        with torch.no_grad():
            lin.weight.mul_(keep)
        layers += [lin, nn.ReLU()] if i + 2 < len(sizes) else [lin]
    model = nn.Sequential(*layers)
    torchslim.prune.magnitude_prune(model, 0.0)  # take the zeros over as the mask
    return torchslim.share.cluster_weights(model, num_clusters=16)


def test_small_dense_layer_joins_the_sparse_codebook_chain(tmp_path):
    # The digits pipeline's shape: the last layer (1000 weights) is denser than 0.15; it still
    # deploys in the sparse-codebook layout, so the MLP runs as one fused chain.
    model = _pruned_shared_mlp([64, 300, 100, 10], [0.12, 0.06, 0.3])
    cls = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    assert len(cls) == 3 and all(m.zero_pinned for m in cls) and cls[-1].density > 0.15
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = model(x)
    for dep in (torchslim.deploy(model), torchslim.load(path, model=_pruned_shared_mlp([64, 300, 100, 10], [1, 1, 1]),
                                                         deploy=True)):
        assert isinstance(dep, DeployedSequential)
        assert all(isinstance(dep[i], DeployedSparseCodebookLinear) for i in (0, 2, 4))
        assert [(start, stop) for start, stop, _, codebook in dep._runs if codebook] == [(0, 5)]
        with torch.inference_mode():
            torch.testing.assert_close(dep(x), ref, rtol=1e-4, atol=1e-5)


def test_large_dense_shared_layer_deploys_fp32_sparse(tmp_path):
    # Above the small-layer size the batch-1 limit holds: a 0.3-dense 300x400 layer (120000
    # weights) deploys as decoded fp32 values.
    model = _pruned_shared_mlp([400, 300, 10], [0.3, 0.1])
    path = tmp_path / "m.safetensors"
    torchslim.save(model, path)
    x = torch.randn(3, 400)
    with torch.no_grad():
        ref = model(x)
    for dep in (torchslim.deploy(model), torchslim.load(path, model=_pruned_shared_mlp([400, 300, 10], [1, 1]),
                                                         deploy=True)):
        assert isinstance(dep[0], DeployedSparseLinear) and isinstance(dep[2], DeployedSparseCodebookLinear)
        with torch.inference_mode():
            torch.testing.assert_close(dep(x), ref, rtol=1e-4, atol=1e-5)
    assert not rules.deploy_as_sparse_codebook(0.3, 120000) and rules.deploy_as_sparse_codebook(0.3, 1000)
    assert not rules.deploy_as_sparse_codebook(0.41, 1000) and rules.deploy_as_sparse_codebook(0.15, 10 ** 7)
