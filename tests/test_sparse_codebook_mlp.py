"""The fused sparse-codebook MLP op (torch.ops.torchslim._sparse_codebook_mlp) and
DeployedSequential running a deployed pruned + shared MLP as one call (issue 13)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.nn import CodebookLinear, DeployedSequential, DeployedSparseCodebookLinear
from torchslim.ops.sparse_codebook_linear import sparse_codebook_pack

OP = torch.ops.torchslim._sparse_codebook_mlp.default
SC = torch.ops.torchslim.sparse_codebook_linear.default
debug = torch.ops.torchslim_debug

# (in, out, density, ReLU after, bias): odd sizes, rows long enough for the SIMD bodies.
LAYERS = [(150, 97, 0.3, True, True), (97, 64, 0.2, True, False), (64, 11, 0.5, False, True)]


def _layer(in_f, out_f, density, k, g, dtype, empty_rows=2, relu=True, bias=True):
    keep = torch.rand(out_f, in_f, generator=g) < density
    keep[:empty_rows] = False  # rows with no kept weight
    labels = torch.randint(0, k, (out_f, in_f), generator=g).to(torch.uint8)
    row_ptr, col_idx, codes = sparse_codebook_pack(labels, keep, num_clusters=k)
    codebook = torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype) if bias else None
    dense = torch.where(keep, codebook.double()[labels.long()], torch.zeros((), dtype=torch.float64))
    return dict(in_f=in_f, out_f=out_f, row_ptr=row_ptr, col_idx=col_idx.to(torch.int16), codes=codes,
                codebook=codebook, bias=b, relu=relu, k=k, dense=dense)


def _chain(k=16, dtype=torch.float32, seed=0, layers=LAYERS):
    g = torch.Generator().manual_seed(seed)
    return [_layer(i, o, d, k, g, dtype, relu=r, bias=b) for i, o, d, r, b in layers]


def _args(chain, dtype):
    """The op's arguments (the packing DeployedSequential does)."""
    plan, rp, nz, cd, cb, bo = [], 0, 0, 0, 0, 0
    for m in chain:
        plan.append([m["in_f"], m["out_f"], rp, nz, cd, cb, m["k"], -1 if m["bias"] is None else bo, int(m["relu"])])
        rp += m["out_f"] + 1
        nz += m["col_idx"].numel()
        cd += m["codes"].numel()
        cb += m["k"]
        bo += 0 if m["bias"] is None else m["out_f"]
    biases = [m["bias"] for m in chain if m["bias"] is not None]
    return [torch.tensor(plan, dtype=torch.int64), torch.cat([m["codebook"] for m in chain]),
            torch.cat([m["row_ptr"] for m in chain]), torch.cat([m["col_idx"] for m in chain]),
            torch.cat([m["codes"] for m in chain]),
            torch.cat(biases) if biases else torch.empty(0, dtype=dtype), chain[-1]["out_f"]]


def _per_layer(chain, x):
    """The per-layer op calls, ReLU between (what the chain must return)."""
    for m in chain:
        x = SC(x, m["row_ptr"], m["col_idx"], m["codes"], m["codebook"], m["bias"])
        if m["relu"]:
            x = torch.relu(x)
    return x


def _dense(chain, x):
    """float64 dense reference: decoded weights, F.linear."""
    x = x.double()
    for m in chain:
        x = F.linear(x, m["dense"], None if m["bias"] is None else m["bias"].double())
        if m["relu"]:
            x = torch.relu(x)
    return x


@pytest.mark.parametrize("k", [16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [0, 1, 2, 3, 17, 256])
def test_matches_per_layer_op_and_dense(batch, dtype, k):
    chain = _chain(k, dtype, seed=batch)
    assert (chain[0]["codes"].numel() == (chain[0]["col_idx"].numel() + 1) // 2) == (k <= 16)  # packed for K <= 16
    x = torch.randn(batch, 150, dtype=dtype)
    y = OP(x, *_args(chain, dtype))
    assert y.shape == (batch, 11) and y.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, _per_layer(chain, x), **tol)
    torch.testing.assert_close(y.double(), _dense(chain, x), **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)))
    if batch:
        assert y.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 150), (5, 4, 150)])
def test_3d_and_non_contiguous_input(shape):
    chain = _chain(seed=1)
    x = torch.randn(*shape)
    y = OP(x, *_args(chain, torch.float32))
    assert y.shape == (*shape[:-1], 11)
    torch.testing.assert_close(y, _per_layer(chain, x), rtol=1e-5, atol=1e-5)
    xt = torch.randn(150, 7).t()  # non-contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(OP(xt, *_args(chain, torch.float32)), _per_layer(chain, xt), rtol=1e-5, atol=1e-5)


def test_layer_with_no_kept_weight_and_single_layer():
    g = torch.Generator().manual_seed(5)
    empty = _layer(40, 30, 0.0, 16, g, torch.float32, empty_rows=0)
    assert empty["col_idx"].numel() == 0
    chain = [_layer(33, 40, 0.4, 16, g, torch.float32), empty, _layer(30, 9, 0.5, 40, g, torch.float32, relu=False)]
    for batch in (1, 20):
        x = torch.randn(batch, 33)
        y = OP(x, *_args(chain, torch.float32))
        torch.testing.assert_close(y, _per_layer(chain, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), _dense(chain, x), rtol=1e-4, atol=1e-4)
    one = chain[:1]
    x = torch.randn(3, 33)
    torch.testing.assert_close(OP(x, *_args(one, torch.float32)), _per_layer(one, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 40])
def test_non_finite_inputs_as_per_layer_op(batch):
    chain = _chain(seed=2)
    x = torch.randn(batch, 150)
    x[0, 3] = float("nan")
    x[-1, 7] = float("inf")
    y = OP(x, *_args(chain, torch.float32))
    want = _per_layer(chain, x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert not torch.isfinite(want).all()  # the test can see a difference
    assert torch.isfinite(y[1:-1]).all()  # other rows untouched


def test_structure_checked_once_and_again_after_an_edit():
    chain = _chain(seed=3)
    args = _args(chain, torch.float32)
    x = torch.randn(2, 150)
    OP(x, *args)
    checks = debug.index_checks()
    OP(x, *args)
    OP(torch.randn(30, 150), *args)
    assert debug.index_checks() == checks  # remembered per structure
    args[3][5] = 150  # an in-place edit: column out of range, seen by the version counter
    with pytest.raises(RuntimeError, match=r"layer 0: col_idx entry 5 is 150, outside \[0, in_features = 150\)"):
        OP(x, *args)
    assert debug.index_checks() == checks + 1


def _bad(i, value, match, k=16):
    chain = _chain(k)
    args = _args(chain, torch.float32)
    if isinstance(i, tuple):  # a plan entry
        args[0][i] = value
    else:
        args[i] = value(args[i])
    with pytest.raises(RuntimeError, match=match):
        OP(torch.randn(2, 150), *args)


@pytest.mark.parametrize("where, value, match", [
    ((0, 0), 149, "layer 0 has in_features 149 but its input has width 150"),
    ((1, 0), 96, "layer 1 has in_features 96 but its input has width 97"),
    ((1, 1), 10 ** 6, "expected 0 <= out_features < row_ptr length"),
    ((0, 8), 2, "activation 2"),
    ((1, 2), 10 ** 6, "row_ptr entries from offset 1000000"),
    ((1, 2), 5, "layer 1: its row_ptr must start at 0, got [1-9]"),
    ((1, 3), 2 ** 62, "col_idx entries from offset 4611686018427387904"),
    ((1, 3), -1, "col_idx entries from offset -1"),
    ((2, 4), 2 ** 62, "codes bytes from offset"),
    ((2, 5), 2 ** 62, "codebook entries from offset"),
    ((2, 6), 0, "num_clusters 0; expected 1..256"),
    ((2, 6), 300, "num_clusters 300"),
    ((0, 7), 2 ** 62, "bias entries from offset"),
])
def test_bad_plans(where, value, match):
    _bad(where, value, match)


def test_bad_arguments():
    _bad(0, lambda p: p[:, :6].contiguous(), r"plan must be a contiguous int64 CPU tensor \[layers >= 1, 9\]")
    _bad(0, lambda p: p.int(), "plan must be a contiguous int64")
    _bad(1, lambda c: c.double(), "codebooks must be a contiguous 1-D Float tensor")
    _bad(2, lambda r: r.long(), "row_ptr must be a contiguous 1-D int32")
    _bad(3, lambda c: c.long(), "col_idx must be a contiguous 1-D int16 or int32")
    _bad(4, lambda c: c.to(torch.int8), "codes must be a contiguous 1-D uint8")
    _bad(5, lambda b: b.double(), "bias must be a contiguous 1-D Float")
    _bad(6, lambda n: 12, r"out_features \(12\) must equal the last layer's \(11\)")
    chain = _chain()
    with pytest.raises(RuntimeError, match="input must be a float32 or float64"):
        OP(torch.randn(2, 150).half(), *_args(chain, torch.float32))


def test_bad_structures():
    # decreasing row_ptr inside layer 0 (its last entry, nnz, unchanged)
    def decreasing(rp):
        rp = rp.clone()
        rp[3] = rp[4] + 1
        return rp
    _bad(2, decreasing, "layer 0: row_ptr decreases after row 3")
    # a column out of range
    def column(ci):
        ci = ci.clone()
        ci[-1] = 64
        return ci
    _bad(3, column, r"layer 2: col_idx entry \d+ is 64, outside \[0, in_features = 64\)")
    # a packed code >= K: layer 0 with K = 16 read as K = 12
    chain = _chain(16)
    args = _args(chain, torch.float32)
    args[0][0, 6] = 12
    args[4][: chain[0]["codes"].numel()] = 0xFF
    with pytest.raises(RuntimeError, match=r"layer 0: codes entry 0 is 15 but the layer has only 12 codebook entries"):
        OP(torch.randn(2, 150), *args)
    # a byte code >= K (K = 40)
    chain = _chain(40)
    args = _args(chain, torch.float32)
    first = chain[0]["codes"].numel()
    args[4][first + 2] = 40
    with pytest.raises(RuntimeError, match=r"layer 1: codes entry 2 is 40 but the layer has only 40 codebook entries"):
        OP(torch.randn(2, 150), *args)
    # int16 columns for a layer wider than int16 can index
    g = torch.Generator().manual_seed(0)
    wide = [_layer(40000, 3, 0.001, 16, g, torch.float32)]
    wide_args = _args(wide, torch.float32)
    wide_args[3] = wide[0]["col_idx"]  # (wrapped) int16
    with pytest.raises(RuntimeError, match="int16 col_idx cannot index"):
        OP(torch.randn(1, 40000), *wide_args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    args = _args(_chain(40 if dtype == torch.float64 else 16, dtype), dtype)
    for shape in [(1, 150), (6, 150), (2, 3, 150), (0, 150)]:
        torch.library.opcheck(OP, (torch.randn(*shape, dtype=dtype), *args))


# ----------------------------------------------------------------------------- DeployedSequential

def _cb_layer(out_f, in_f, density, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.bias.copy_(torch.randn(out_f, generator=g))
    mask = torch.rand(out_f, in_f, generator=g) < density
    return CodebookLinear.from_dense(lin, k, mask=mask, max_iter=20)


def _lenet(k=16):
    """LeNet-300-100, 92% pruned (the last layer 85%, so that it stays sparse-codebook), K clusters."""
    return nn.Sequential(_cb_layer(300, 784, 0.08, k, 1), nn.ReLU(), _cb_layer(100, 300, 0.08, k, 2), nn.ReLU(),
                         nn.Dropout(0.5), _cb_layer(10, 100, 0.12, k, 3))


def _op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("torchslim::")]


@pytest.mark.parametrize("k", [16, 40])
@pytest.mark.parametrize("batch", [1, 3, 256])
def test_deployed_pruned_shared_mlp_runs_one_call(batch, k):
    model = _lenet(k).eval()
    x = torch.randn(batch, 784)
    with torch.no_grad():
        want = model(x)
    dep = torchslim.deploy(model)
    assert type(dep) is DeployedSequential
    assert all(isinstance(dep[i], DeployedSparseCodebookLinear) for i in (0, 2, 5))
    assert dep._runs == [(0, 6, 10, True)]
    floats = {n: t.numel() for n, t in dep.named_buffers() if t.dtype.is_floating_point and n.startswith("_run")}
    assert floats == {"_run0_codebooks": 3 * k, "_run0_bias": 410}  # no fp32 values
    with torch.inference_mode():
        names = _op_names(lambda: dep(x))
        got = dep(x)
    assert names == ["torchslim::_sparse_codebook_mlp"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # grad mode off, not inference mode: the same fused call
        assert _op_names(lambda: dep(x)) == ["torchslim::_sparse_codebook_mlp"]
    # grad mode on (input without grad): module calls, one op call per layer
    assert _op_names(lambda: dep(x)).count("torchslim::sparse_codebook_linear") == 3


def test_deployed_float64_3d_and_fallbacks():
    model = _lenet().eval()
    dep = torchslim.deploy(model)
    x = torch.randn(2, 3, 784)
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-4)
    d64 = torchslim.deploy(model).to(torch.float64)
    assert d64._runs == [(0, 6, 10, True)] and d64._buffers["_run0_codebooks"].dtype == torch.float64
    with torch.inference_mode():
        assert _op_names(lambda: d64(x.double())) == ["torchslim::_sparse_codebook_mlp"]
        torch.testing.assert_close(d64(x.double()), want.double(), rtol=1e-5, atol=1e-4)
    # a bfloat16 deploy does not fuse: its layers run as the per-layer op
    bf = torchslim.deploy(model).to(torch.bfloat16)
    assert bf._runs == []
    with torch.inference_mode():
        assert _op_names(lambda: bf(x.bfloat16())).count("torchslim::sparse_codebook_linear") == 3
    # a wrong width reaches the per-layer path and its clear error
    with torch.inference_mode(), pytest.raises(ValueError, match="in_features = 784"):
        dep(torch.randn(2, 783))


@pytest.mark.parametrize("batch", [1, 20])
def test_zero_width_middle_layer(batch):
    g = torch.Generator().manual_seed(7)
    chain = [_layer(33, 0, 0.3, 16, g, torch.float32, empty_rows=0),
             _layer(0, 9, 0.3, 16, g, torch.float32, empty_rows=0, relu=False)]
    x = torch.randn(batch, 33)
    y = OP(x, *_args(chain, torch.float32))
    torch.testing.assert_close(y, chain[1]["bias"].expand(batch, 9))  # only the last bias reaches the output
