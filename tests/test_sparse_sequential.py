"""SparseSequential and the fused sparse MLP op (torch.ops.torchslim._sparse_mlp)."""
import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import torchslim
import torchslim.io as tio
import torchslim.prune as tprune
import torchslim.nn.sparse_sequential as ss
from torchslim.nn import MaskedSparseLinear, SparseSequential

OP = torch.ops.torchslim._sparse_mlp.default


def sparse_layer(in_f, out_f, density, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = MaskedSparseLinear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=dtype) / in_f ** 0.5)
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g, dtype=dtype))
    layer.set_mask(torch.rand(out_f, in_f, generator=g) < density)
    return layer


def mlp(dims=(37, 53, 29, 11), densities=(0.1, 0.3, 0.5), dtype=torch.float32, bias=True):
    mods = []
    for i, d in enumerate(densities):
        mods.append(sparse_layer(dims[i], dims[i + 1], d, dtype=dtype, bias=bias, seed=i))
        if i + 1 < len(densities):
            mods.append(nn.ReLU())
    return SparseSequential(*mods).eval()


def reference(model, x):
    """float64 plain-PyTorch evaluation of the container's children."""
    h = x.double()
    for m in model:
        if isinstance(m, MaskedSparseLinear):
            w = torch.where(m.mask, m.weight.detach().double(), 0.0)
            h = h @ w.T + (m.bias.detach().double() if m.bias is not None else 0.0)
        else:
            h = m.double()(h) if list(m.parameters()) else m(h)
    return h


class CountCalls:
    """Counts the fused op's calls made by SparseSequential (so that a test can check the
    fused path really ran)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ss.sparse_mlp

        def wrapped(*args):
            self.calls += 1
            return real(*args)
        monkeypatch.setattr(ss, "sparse_mlp", wrapped)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 37), (2, 37), (3, 37), (17, 37), (64, 37), (0, 37), (37,), (4, 5, 37)])
def test_matches_reference(dtype, shape, monkeypatch):
    calls = CountCalls(monkeypatch)
    model = mlp(dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        y = model(x)
    assert calls.calls == 1
    assert y.shape == (*shape[:-1], 11) and y.dtype == dtype
    torch.testing.assert_close(y.double(), reference(model, x), **tol(dtype))


def test_non_contiguous_and_no_bias(monkeypatch):
    calls = CountCalls(monkeypatch)
    model = mlp(bias=False)
    x = torch.randn(37, 9).T  # [9, 37], non-contiguous
    with torch.inference_mode():
        y = model(x)
    assert calls.calls == 1
    torch.testing.assert_close(y.double(), reference(model, x), **tol(torch.float32))


def test_runs_around_other_modules(monkeypatch):
    calls = CountCalls(monkeypatch)
    model = SparseSequential(
        nn.Flatten(), sparse_layer(12, 40, 0.2, seed=1), nn.Dropout(0.5), nn.ReLU(), nn.Identity(),
        sparse_layer(40, 30, 0.2, seed=2), nn.Tanh(), sparse_layer(30, 20, 0.3, seed=3), nn.ReLU(),
        sparse_layer(20, 7, 0.4, seed=4)).eval()
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        y = model(x)
    assert calls.calls == 2  # [linear, dropout, relu, identity, linear] | tanh | [linear, relu, linear]
    torch.testing.assert_close(y.double(), reference(model, x), **tol(torch.float32))
    plain = nn.Sequential(*model).eval()
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-6)


def test_two_relus_in_a_row_and_trailing_relu():
    model = SparseSequential(sparse_layer(10, 20, 0.3), nn.ReLU(), nn.ReLU(), sparse_layer(20, 5, 0.4, seed=1),
                             nn.ReLU()).eval()
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), reference(model, x), **tol(torch.float32))
        assert (model(x) >= 0).all()


def test_dense_large_layer_is_not_fused_and_still_correct(monkeypatch):
    calls = CountCalls(monkeypatch)
    model = SparseSequential(sparse_layer(300, 300, 1.0), nn.ReLU(), sparse_layer(300, 10, 0.1, seed=1)).eval()
    x = torch.randn(3, 300)
    with torch.no_grad():
        y = model(x)
    assert calls.calls == 1  # only the second layer's run
    torch.testing.assert_close(y.double(), reference(model, x), rtol=1e-4, atol=1e-4)


def test_large_sparse_layer_uses_threads_and_matches():
    model = SparseSequential(sparse_layer(2048, 1536, 0.05), nn.ReLU(), sparse_layer(1536, 100, 0.2, seed=1)).eval()
    for b in (1, 40):
        x = torch.randn(b, 2048)
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), reference(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 40])
def test_non_finite_inputs_match_per_layer_semantics(batch):
    model = mlp()
    plain = nn.Sequential(*model).eval()
    x = torch.randn(batch, 37)
    x[0, 3] = float("nan")
    x[-1, 5] = float("inf")
    x[-1, 6] = float("-inf")
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), equal_nan=True, rtol=1e-5, atol=1e-6)
    # a weight large enough to overflow in the middle of the chain
    with torch.no_grad():
        model[0].weight[model[0].mask].fill_(3e38)
        x = torch.rand(batch, 37) + 1
        torch.testing.assert_close(model(x), plain(x), equal_nan=True, rtol=1e-5, atol=1e-6)


def test_cache_follows_weight_mask_bias_and_dtype(monkeypatch):
    calls = CountCalls(monkeypatch)
    model = mlp()
    x = torch.randn(4, 37)
    with torch.no_grad():
        model(x)
        model[0].weight.mul_(2)                       # optimizer-style in-place update
        torch.testing.assert_close(model(x).double(), reference(model, x), **tol(torch.float32))
        model[2].bias.add_(1)
        torch.testing.assert_close(model(x).double(), reference(model, x), **tol(torch.float32))
        model[4].set_mask(torch.rand(11, 29) < 0.2)
        torch.testing.assert_close(model(x).double(), reference(model, x), **tol(torch.float32))
        model[0].mask[:, :5] = False                  # in-place mask edit
        torch.testing.assert_close(model(x).double(), reference(model, x), **tol(torch.float32))
        model[2].weight = nn.Parameter(torch.randn(29, 53))  # a new Parameter object
        torch.testing.assert_close(model(x).double(), reference(model, x), **tol(torch.float32))
    assert calls.calls == 6
    model.double()
    with torch.no_grad():
        y = model(x.double())
    assert calls.calls == 7 and y.dtype == torch.float64
    torch.testing.assert_close(y, reference(model, x), **tol(torch.float64))
    model.to(torch.bfloat16)  # not fusable: plain path
    with torch.no_grad():
        y = model(x.to(torch.bfloat16))
    assert calls.calls == 7 and y.dtype == torch.bfloat16


def test_denser_mask_later_leaves_the_fused_path(monkeypatch):
    calls = CountCalls(monkeypatch)
    model = SparseSequential(sparse_layer(300, 300, 0.1), nn.ReLU(), sparse_layer(300, 10, 0.1, seed=1)).eval()
    x = torch.randn(2, 300)
    with torch.no_grad():
        model(x)
        model[0].set_mask(torch.ones(300, 300, dtype=torch.bool))
        y = model(x)
    assert calls.calls == 1
    torch.testing.assert_close(y.double(), reference(model, x), rtol=1e-4, atol=1e-4)


def test_training_and_gradients_use_the_plain_path(monkeypatch):
    calls = CountCalls(monkeypatch)
    model = SparseSequential(sparse_layer(10, 20, 0.3), nn.Dropout(0.5), nn.ReLU(), sparse_layer(20, 5, 0.4, seed=1))
    x = torch.randn(8, 10)
    model.train()
    y = model(x)                # gradients needed: autograd path
    y.sum().backward()
    assert model[0].weight.grad is not None and calls.calls == 0
    assert (model[0].weight.grad[~model[0].mask] == 0).all()
    with torch.no_grad():       # training-mode dropout is not fused
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        b = nn.Sequential(*model)(x)
    assert calls.calls == 2  # training-mode dropout splits the chain: two single-layer runs
    torch.testing.assert_close(a, b)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)                    # grad mode on, but nothing requires grad: fused
    assert calls.calls == 3
    x.requires_grad_(True)
    model(x).sum().backward()   # input requires grad: plain path with autograd
    assert x.grad is not None and calls.calls == 3


def test_wrong_input_gives_the_layer_error():
    model = mlp()
    with torch.no_grad(), pytest.raises(RuntimeError, match="in_features|shape"):
        model(torch.randn(2, 36))


def test_state_dict_copy_pickle_and_to_sparse():
    seq = nn.Sequential(nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 11))
    pruned = tprune.magnitude_prune(seq, 0.8, scope="layer").eval()
    model = tio.to_sparse(pruned)
    assert type(model) is SparseSequential
    assert list(model.state_dict()) == list(pruned.state_dict())
    x = torch.randn(3, 37)
    with torch.no_grad():
        expected = pruned(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), expected, rtol=1e-5, atol=1e-6)
        fresh = tio.to_sparse(tprune.magnitude_prune(
            nn.Sequential(nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 11)), 0.8, scope="layer")).eval()
        fresh.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    nested = tio.to_sparse(nn.Sequential(nn.Flatten(), copy.deepcopy(pruned)))
    assert type(nested) is nn.Sequential and type(nested[1]) is SparseSequential


def test_save_and_load_round_trip(tmp_path):
    pruned = tprune.magnitude_prune(nn.Sequential(nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 11)), 0.8,
                                    scope="layer").eval()
    model = tio.to_sparse(pruned)
    path = tmp_path / "m.safetensors"
    tio.save(model, path)
    again = tio.to_sparse(tio.load(path)).eval()
    assert type(again) is SparseSequential
    x = torch.randn(4, 37)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_compile_falls_back_to_the_layer_ops():
    model = mlp()
    x = torch.randn(5, 37)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_concurrent_calls():
    model = mlp(dims=(200, 300, 100, 10))
    xs = [torch.randn(b, 200) for b in (1, 3, 1, 32, 1, 7, 2, 1)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    results, errors = [None] * len(xs), []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    results[i] = model(xs[i])
        except Exception as exc:  # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        torch.testing.assert_close(r, e)


# ---------------------------------------------------------------- the op itself

def op_args(dtype=torch.float32):
    model = mlp(dtype=dtype)
    with torch.no_grad():
        model(torch.randn(1, 37, dtype=dtype))
    return model, model._plan()[3][0].arguments()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    _, args = op_args(dtype)
    for shape in [(1, 37), (6, 37), (2, 3, 37), (0, 37)]:
        torch.library.opcheck(OP, (torch.randn(*shape, dtype=dtype), *args))


def corrupt(args, i, value):
    args = list(args)
    args[i] = value
    return args


def test_op_rejects_bad_arguments():
    _, (plan, values, row_ptr, col_idx, bias, out) = op_args()
    x = torch.randn(2, 37)
    good = (plan, values, row_ptr, col_idx, bias, out)
    OP(x, *good)

    def bad_plan(row, col, value):
        p = plan.clone()
        p[row, col] = value
        return corrupt(good, 0, p)

    cases = [
        (corrupt(good, 0, plan.int()), "plan must be"),
        (corrupt(good, 0, plan[:, :5].contiguous()), "plan must be"),
        (bad_plan(1, 0, 52), "in_features"),
        (bad_plan(0, 1, 54), "in_features|row_ptr"),
        (bad_plan(2, 5, 2), "activation"),
        (bad_plan(2, 2, row_ptr.numel()), "row_ptr"),
        (bad_plan(1, 3, values.numel()), "col_idx"),
        (bad_plan(1, 3, -1), "col_idx"),
        (bad_plan(2, 4, bias.numel()), "bias"),
        (bad_plan(2, 4, -2), "bias"),
        (corrupt(good, 1, values.double()), "values must be"),
        (corrupt(good, 1, values[:-1]), "values must be"),
        (corrupt(good, 2, row_ptr.long()), "row_ptr must be"),
        (corrupt(good, 3, col_idx.float()), "col_idx must be"),
        (corrupt(good, 4, bias.double()), "bias must be"),
        (corrupt(good, 5, out + 1), "out_features"),
    ]
    rp = row_ptr.clone()
    a, b = int(rp[3]), int(rp[4])
    rp[3], rp[4] = b + 1, a  # row 3 now ends before it starts
    cases.append((corrupt(good, 2, rp), "decreases|start at 0|needs col_idx"))
    for k, v in ((0, -1), (5, 37), (int(plan[1, 3]), 53), (int(plan[1, 3]) + 1, -7)):
        ci = col_idx.clone()
        ci[k] = v
        cases.append((corrupt(good, 3, ci), "outside \\[0, in_features"))
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            OP(x, *args)
    with pytest.raises(RuntimeError, match="input must be"):
        OP(x.to(torch.bfloat16), *good)
    with pytest.raises(RuntimeError, match="in_features"):
        OP(torch.randn(2, 36), *good)


def test_op_int16_indices_cannot_index_wide_layers():
    plan = torch.tensor([[40000, 1, 0, 0, -1, 0]])
    with pytest.raises(RuntimeError, match="int16"):
        OP(torch.randn(1, 40000), plan, torch.ones(1), torch.tensor([0, 1], dtype=torch.int32),
           torch.tensor([5], dtype=torch.int16), torch.empty(0), 1)
    y = OP(torch.arange(40000.0).unsqueeze(0), plan, torch.ones(1), torch.tensor([0, 1], dtype=torch.int32),
           torch.tensor([39999], dtype=torch.int32), torch.empty(0), 1)
    assert y.item() == 39999.0


# --------------------------------------------------------------------------- exact types, forced paths


class _LeakyReLU(nn.ReLU):
    """A ReLU subclass that computes something else: it must not be fused as a ReLU."""

    def forward(self, x):
        return torch.nn.functional.leaky_relu(x, 0.3)


class _ScaledDropout(nn.Dropout):
    """A Dropout subclass that is not the identity in eval mode."""

    def forward(self, x):
        return 2.0 * x


@pytest.mark.parametrize("odd", [_LeakyReLU, _ScaledDropout])
def test_relu_and_dropout_subclasses_are_not_fused_as_plain(odd, monkeypatch):
    calls = CountCalls(monkeypatch)
    model = SparseSequential(sparse_layer(37, 53, 0.1), odd(), sparse_layer(53, 11, 0.2, seed=1)).eval()
    x = torch.randn(4, 37)
    with torch.no_grad():
        y = model(x)
        want = nn.Sequential(*model).eval()(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), reference(model, x), **tol(torch.float32))
    assert calls.calls == 2  # two runs of one layer each, with the subclass between them
    # Plain ReLU / Dropout in the same place: one fused run.
    plain = SparseSequential(model[0], nn.ReLU() if odd is _LeakyReLU else nn.Dropout(), model[2]).eval()
    with torch.no_grad():
        plain(x)
    assert calls.calls == 3


def test_force_path_sparse_fuses_dense_layers_and_dense_fuses_none(monkeypatch):
    from torchslim.nn import force_path

    calls = CountCalls(monkeypatch)
    model = SparseSequential(sparse_layer(300, 300, 0.9), nn.ReLU(), sparse_layer(300, 10, 0.1, seed=1)).eval()
    x = torch.randn(3, 300)
    with torch.no_grad():
        model(x)
        assert calls.calls == 1 and model[0].last_path == "dense" and model[2].last_path == "fused"
        with force_path("sparse"):
            y = model(x)
            assert calls.calls == 2 and model[0].last_path == "fused" and model[2].last_path == "fused"
        torch.testing.assert_close(y.double(), reference(model, x), rtol=1e-4, atol=1e-4)
        with force_path("dense"):
            y = model(x)
            assert calls.calls == 2 and model[0].last_path == "dense" and model[2].last_path == "dense"
        torch.testing.assert_close(y.double(), reference(model, x), rtol=1e-4, atol=1e-4)
        model(x)
        assert calls.calls == 3 and model[0].last_path == "dense"


def test_meta_input_raises_like_sequential_of_linears():
    model = mlp()
    x = torch.randn(2, 37, device="meta")
    with pytest.raises(RuntimeError):
        nn.Sequential(nn.Linear(37, 53))(x)
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="device"):
        model(x)
