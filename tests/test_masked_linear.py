"""torchslim.ops.masked_linear and the torch.ops.torchslim masked structure ops."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchslim
from torchslim.ops import masked_linear
from torchslim.ops._reference import ref_masked_linear

ops = torch.ops.torchslim
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sample_inputs(lead, in_f, out_f, sparsity, dtype=torch.float32, device="cpu", bias=True, seed=0,
                  requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=gen, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    mask = torch.rand(out_f, in_f, generator=gen) >= sparsity
    b = torch.randn(out_f, generator=gen, dtype=torch.float64) if bias else None

    def conv(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return conv(x), conv(w), mask.to(device), conv(b)


def reference_grads(x, w, mask, b, grad):
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    y = ref_masked_linear(xr, wr, mask, br)
    grads = torch.autograd.grad(y, [t for t in (xr, wr, br) if t is not None], grad.double())
    return y.detach(), grads


def check_against_reference(x, w, mask, b, tol):
    y = masked_linear(x, w, mask, b)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y)
    want_y, want_grads = reference_grads(x, w, mask, b, grad)
    torch.testing.assert_close(y.double(), want_y, **tol)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad)
    for g, r in zip(got, want_grads):
        torch.testing.assert_close(g.double(), r, **tol)
    assert bool((got[1][~mask] == 0).all()), "grad of weight must be exactly zero where mask is False"


TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,in_f,out_f", [((1,), 37, 29), ((5,), 64, 33), ((70,), 19, 45), ((2, 9), 50, 7),
                                              ((3, 1, 33), 8, 131), ((1,), 1, 1)])
def test_matches_reference(lead, in_f, out_f, sparsity, dtype):
    x, w, mask, b = sample_inputs(lead, in_f, out_f, sparsity, dtype, requires_grad=True, seed=in_f * out_f)
    check_against_reference(x, w, mask, b, TOL[dtype])


# What the dense fallback runs (F.linear / matmul); the sparse kernels run none of these.
DENSE_OPS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"}


@pytest.mark.parametrize("batch", [1, 16, 131])
def test_larger_layer_sparse_path(batch, ops_ran):
    """60,000 weights at density 0.1: forward, input and weight gradients all on the sparse
    kernels (no dense product ran), matching the float64 reference, in training and in
    inference (batch 1 included: above 32,768 weights); at density 0.9 the same layer falls
    back to dense products, so the op-name check does tell the paths apart."""
    def run(sparsity, grad):
        x, w, mask, b = sample_inputs((batch,), 300, 200, sparsity, requires_grad=grad, seed=batch)
        g = torch.randn(batch, 200, generator=torch.Generator().manual_seed(1))
        got = {}

        def ours():
            with torch.set_grad_enabled(grad):
                got["y"] = masked_linear(x, w, mask, b)
                if grad:
                    got["grads"] = torch.autograd.grad(got["y"], (x, w, b), g)
        ran = ops_ran(ours)
        want_y, want_grads = reference_grads(x, w, mask, b, g)
        torch.testing.assert_close(got["y"].double(), want_y, **TOL[torch.float32])
        for have, want in zip(got.get("grads", ()), want_grads):
            torch.testing.assert_close(have.double(), want, **TOL[torch.float32])
        return ran

    for grad in (True, False):
        ran = run(0.9, grad)
        assert "torchslim::masked_linear" in ran
        if grad:
            assert {"torchslim::masked_linear_grad_input", "torchslim::masked_linear_grad_weight"} <= ran
        assert not ran & DENSE_OPS, f"dense products ran (grad={grad}): {sorted(ran & DENSE_OPS)}"
    assert run(0.1, True) & DENSE_OPS


@pytest.mark.parametrize("lead,in_f,out_f,sparsity", [((1,), 37, 29, 0.5), ((1,), 300, 200, 0.05), ((5,), 64, 33, 0.9),
                                                      ((2, 3), 19, 45, 0.0), ((3, 1, 4), 8, 13, 0.99), ((1,), 1, 1, 0.0),
                                                      ((0,), 10, 6, 0.5), ((2, 0), 10, 6, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_both_paths_match_reference(lead, in_f, out_f, sparsity, dtype, masked_path):
    """MaskedSparseLinear forced onto each path (small layers at batch 1 would otherwise
    always run dense): forward under no_grad and with gradients, input/weight/bias gradients,
    exact zeros at masked weights, odd and empty shapes, 3-D and non-contiguous input."""
    x, w, mask, b = sample_inputs(lead, in_f, out_f, sparsity, dtype, seed=in_f * 7 + out_f)
    linear = torch.nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    layer = torchslim.nn.MaskedSparseLinear.from_dense(linear, mask=mask)
    if x.dim() >= 2 and x.shape[-2] > 1:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    with torch.no_grad():
        y = layer(x)
    assert layer.last_path == masked_path
    want = ref_masked_linear(x.double(), w.double(), mask, b.double())
    torch.testing.assert_close(y.double(), want, **TOL[dtype])
    xg = x.detach().clone().requires_grad_()
    y = layer(xg)
    assert layer.last_path == masked_path
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, (xg, layer.weight, layer.bias), g)
    want_y, (rx, rw, rb) = reference_grads(xg, layer.weight, mask, layer.bias, g)
    for got, ref in ((y, want_y), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    assert bool((gw[~mask] == 0).all())


def test_no_bias_and_wide_indices():
    # in_features > 32767 needs int32 column indices.
    x, w, mask, _ = sample_inputs((3,), 33000, 3, 0.99, requires_grad=True)
    check_against_reference(x, w, mask, None, TOL[torch.float32])
    row_ptr, col_idx, t_row_ptr, t_col_idx = ops._masked_structure(mask)
    assert col_idx.dtype == torch.int32 and t_col_idx.dtype == torch.int16


def test_structure_layout():
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, True]])
    row_ptr, col_idx, t_row_ptr, t_col_idx = ops._masked_structure(mask)
    t_perm = ops._masked_structure_perm(row_ptr, col_idx, t_row_ptr)
    assert row_ptr.tolist() == [0, 2, 2, 4] and col_idx.tolist() == [0, 2, 1, 2]
    assert t_row_ptr.tolist() == [0, 1, 2, 4] and t_col_idx.tolist() == [0, 2, 0, 2]
    assert t_perm.tolist() == [0, 2, 1, 3]
    w = torch.arange(9.0).reshape(3, 3)
    assert ops._masked_gather(w, row_ptr, col_idx, False).tolist() == [0.0, 2.0, 7.0, 8.0]
    assert ops._masked_gather(w, t_row_ptr, t_col_idx, True).tolist() == [0.0, 7.0, 2.0, 8.0]
    # The structure ops directly, at batch 1 (SpMV) and batch > 1 (SpMM), whatever the size.
    values = ops._masked_gather(w, row_ptr, col_idx, False)
    b = torch.tensor([1.0, -2.0, 0.5])
    for batch in (1, 3):
        x = torch.randn(batch, 3)
        torch.testing.assert_close(ops._masked_spmm(x, values, row_ptr, col_idx, b), ref_masked_linear(x, w, mask, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 40])
def test_low_precision(dtype, batch):
    # fp32 accumulation: the error against an fp32 reference is at most 2x PyTorch's own.
    x, w, mask, b = sample_inputs((batch,), 96, 48, 0.9, dtype)
    want = ref_masked_linear(x.float(), w.float(), mask, b.float())
    got = masked_linear(x, w, mask, b)
    assert got.dtype == dtype
    own = ref_masked_linear(x, w, mask, b)
    err, err_own = (got.float() - want).abs().max(), (own.float() - want).abs().max()
    assert err <= 2 * err_own + 1e-3


def test_noncontiguous_inputs():
    x, w, mask, b = sample_inputs((20,), 24, 36, 0.9)
    xn = x.t().contiguous().t()
    wn = w.t().contiguous().t()
    maskn = mask.t().contiguous().t()
    x3 = torch.randn(4, 20, 24).transpose(0, 1)[:, ::2]  # [20, 2, 24] strided
    assert not xn.is_contiguous() and not wn.is_contiguous() and not maskn.is_contiguous()
    torch.testing.assert_close(masked_linear(xn, wn, maskn, b), ref_masked_linear(x, w, mask, b))
    torch.testing.assert_close(masked_linear(x3, w, mask, b), ref_masked_linear(x3, w, mask, b))


@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_empty_batch(lead):
    x, w, mask, b = sample_inputs(lead, 10, 6, 0.9, requires_grad=True)
    y = masked_linear(x, w, mask, b)
    assert y.shape == (*lead, 6)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and bool((gw == 0).all()) and bool((gb == 0).all())


@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_nan_inf_propagate_like_dense(batch, sparsity):
    x, w, mask, b = sample_inputs((batch,), 40, 24, sparsity)
    mask[:, 3] = False
    mask[:, 7] = True
    x[0, 5] = float("nan")
    x[-1, 3] = float("inf")  # reaches only masked weights: 0 * inf = NaN in a dense product
    x[batch // 2, 7] = -float("inf")
    y = masked_linear(x, w, mask, b)
    torch.testing.assert_close(y, ref_masked_linear(x, w, mask, b), equal_nan=True)
    assert torch.isnan(y[0]).all()
    w2 = w.clone()
    w2[3, 7] = float("nan")
    torch.testing.assert_close(masked_linear(x, w2, mask, b), ref_masked_linear(x, w2, mask, b), equal_nan=True)


def test_masked_weights_are_structural_zeros():
    # A NaN stored at a masked position does not reach the output (pruned = absent).
    x, w, mask, b = sample_inputs((4,), 16, 8, 0.9)
    w2 = w.clone()
    w2[~mask] = float("nan")
    torch.testing.assert_close(masked_linear(x, w2, mask, b), masked_linear(x, w, mask, b))


def test_all_false_and_all_true_masks():
    x, w, _, b = sample_inputs((7,), 12, 9, 0.0, requires_grad=True)
    check_against_reference(x, w, torch.zeros(9, 12, dtype=torch.bool), b, TOL[torch.float32])
    check_against_reference(x, w, torch.ones(9, 12, dtype=torch.bool), b, TOL[torch.float32])
    y = masked_linear(x, w, torch.zeros(9, 12, dtype=torch.bool), b)
    torch.testing.assert_close(y, b.expand(7, 9))


def test_non_bool_mask_is_nonzero():
    x, w, mask, b = sample_inputs((4,), 10, 6, 0.5)
    scaled = mask.float() * 0.5 + mask.float()  # 1.5 where kept, 0 elsewhere
    torch.testing.assert_close(masked_linear(x, w, scaled, b), ref_masked_linear(x, w, mask, b))


@pytest.mark.parametrize("case,pattern", [
    ("in_features", "in_features"), ("mask_shape", "mask"), ("bias_len", "bias"), ("weight_int", "weight"),
    ("dtype_mix", "dtype"), ("weight_1d", "weight"), ("bias_dtype", "bias"), ("input_0d", "input"),
])
def test_bad_arguments_name_the_argument(case, pattern):
    x, w, mask, b = sample_inputs((3,), 8, 5, 0.5)
    if case == "in_features":
        x = torch.randn(3, 9)
    elif case == "mask_shape":
        mask = torch.ones(6, 8, dtype=torch.bool)
    elif case == "bias_len":
        b = torch.randn(7)
    elif case == "weight_int":
        w = torch.randint(0, 3, (5, 8))
    elif case == "dtype_mix":
        x = x.double()
    elif case == "weight_1d":
        w = w.reshape(-1)
    elif case == "bias_dtype":
        b = b.double()
    elif case == "input_0d":
        x = torch.tensor(1.0)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        masked_linear(x, w, mask, b)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input"):
        masked_linear([1.0, 2.0], torch.randn(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_structure_ops_check_arguments():
    mask = torch.rand(6, 8) < 0.5
    row_ptr, col_idx, _, _ = ops._masked_structure(mask)
    values = ops._masked_gather(torch.randn(6, 8), row_ptr, col_idx, False)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="values"):
        ops._masked_spmm(x, values[:-1], row_ptr, col_idx, None)
    with pytest.raises(RuntimeError, match="values"):
        ops._masked_spmm(x.double(), values, row_ptr, col_idx, None)
    with pytest.raises(RuntimeError, match="row_ptr"):
        ops._masked_spmm(x, values, row_ptr.long(), col_idx, None)
    with pytest.raises(RuntimeError, match="row_ptr"):
        ops._masked_gather(torch.randn(7, 8), row_ptr, col_idx, False)
    with pytest.raises(RuntimeError, match="mask"):
        ops._masked_structure(mask.float())


@pytest.mark.parametrize("inference", [False, True])
def test_structure_ops_check_every_index(inference):
    """A hand-made or edited structure is checked before any kernel reads it: out-of-range
    or negative column indices and decreasing row pointers are errors, never a read
    outside the input. A structure that passed is remembered, and checked again after an
    in-place edit (inference tensors, which have no version counter, on every call)."""
    mask = torch.rand(6, 8) < 0.5
    mask[0, :3] = True
    row_ptr, col_idx, t_row_ptr, t_col_idx = ops._masked_structure(mask)
    weight = torch.randn(6, 8)
    values = ops._masked_gather(weight, row_ptr, col_idx, False)
    values_t = ops._masked_gather(weight, t_row_ptr, t_col_idx, True)
    x, g = torch.randn(3, 8), torch.randn(3, 6)

    def calls(rp, ci, trp, tci):
        return [
            lambda: ops._masked_spmm(x, values, rp, ci, None),
            lambda: ops._masked_sddmm(g, x, rp, ci),
            lambda: ops._masked_gather(weight, rp, ci, False),
            lambda: ops._masked_backward(g, x, values_t, rp, ci, trp, tci, True, True),
        ]
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        for bad, msg in ((8, "outside \\[0, 8\\)"), (-1, "outside \\[0, 8\\)"), (30000, "outside")):
            ci = col_idx.clone()
            for call in calls(row_ptr, ci, t_row_ptr, t_col_idx):
                call()                      # valid: runs (and may be remembered)
            ci[1] = bad                     # in-place edit: checked again
            for call in calls(row_ptr, ci, t_row_ptr, t_col_idx):
                with pytest.raises(RuntimeError, match=msg):
                    call()
        rp = row_ptr.clone()
        a, b = int(rp[1]), int(rp[2])
        rp[1], rp[2] = b + 1, a             # row 1 ends before it starts
        for call in calls(rp, col_idx, t_row_ptr, t_col_idx):
            with pytest.raises(RuntimeError, match="row_ptr"):
                call()
        tci = t_col_idx.clone()
        tci[0] = 6                          # the transposed structure indexes the 6 rows
        with pytest.raises(RuntimeError, match="outside \\[0, 6\\)"):
            ops._masked_backward(g, x, values_t, row_ptr, col_idx, t_row_ptr, tci, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_masked_dense_is_where(dtype):
    """_masked_dense(weight, mask) == where(mask, weight, 0) bit for bit, NaN/inf included,
    for odd sizes, non-contiguous weights and every floating dtype; it is the dense path's
    weight and weight-gradient masking."""
    for shape in [(1, 1), (7, 13), (300, 301), (0, 5)]:
        w = torch.randn(*shape).to(dtype)
        mask = torch.rand(*shape) < 0.4
        if w.numel():
            w.view(-1)[0] = float("nan")
            w.view(-1)[-1] = float("inf")
        for weight in (w, w.T.contiguous().T):  # non-contiguous view of the same values
            out = ops._masked_dense(weight, mask)
            ref = torch.where(mask, weight, torch.zeros((), dtype=dtype))
            assert out.dtype == dtype and out.shape == weight.shape
            assert torch.equal(out.view(torch.int16 if dtype.itemsize == 2 else
                                        torch.int32 if dtype.itemsize == 4 else torch.int64),
                               ref.contiguous().view(torch.int16 if dtype.itemsize == 2 else
                                                     torch.int32 if dtype.itemsize == 4 else torch.int64))
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        ops._masked_dense(torch.randn(2, 2), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="shape of weight"):
        ops._masked_dense(torch.randn(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="floating"):
        ops._masked_dense(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))


def test_gradcheck_float64():
    for sparsity in (0.0, 0.7):
        x, w, mask, b = sample_inputs((3, 2), 6, 5, sparsity, torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, mask, b), (x, w, b))
    x, w, mask, b = sample_inputs((1,), 7, 4, 0.8, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, mask, b), (x, w, b))


def test_opcheck():
    samples = [sample_inputs((4,), 12, 10, 0.9, requires_grad=True), sample_inputs((2, 3), 9, 5, 0.0),
               sample_inputs((1,), 16, 8, 0.8, torch.float64, requires_grad=True, bias=False)]
    for x, w, mask, b in samples:
        torch.library.opcheck(ops.masked_linear.default, (x, w, mask, b))
        g = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype)
        torch.library.opcheck(ops.masked_linear_grad_input.default, (g, w.detach(), mask))
        torch.library.opcheck(ops.masked_linear_grad_weight.default, (g, x.detach(), mask))
    x, w, mask, b = sample_inputs((5,), 12, 10, 0.8)
    row_ptr, col_idx, t_row_ptr, t_col_idx = ops._masked_structure(mask)
    t_perm = ops._masked_structure_perm(row_ptr, col_idx, t_row_ptr)
    values = ops._masked_gather(w, row_ptr, col_idx, False)
    values_t = ops._masked_gather(w, t_row_ptr, t_col_idx, True)
    assert torch.equal(values_t, values[t_perm.long()])
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops._masked_gather.default, (w, row_ptr, col_idx, False), test_utils=checks)
    torch.library.opcheck(ops._masked_spmm.default, (x, values, row_ptr, col_idx, b), test_utils=checks)
    torch.library.opcheck(ops._masked_structure.default, (mask,), test_utils=("test_schema",))
    torch.library.opcheck(ops._masked_structure_perm.default, (row_ptr, col_idx, t_row_ptr), test_utils=checks)
    torch.library.opcheck(ops._masked_sddmm.default, (torch.randn(5, 10), x, row_ptr, col_idx), test_utils=checks)
    dw = ops._masked_sddmm(torch.ones(5, 10), x, row_ptr, col_idx)
    torch.testing.assert_close(dw, torch.where(mask, torch.ones(5, 10).t() @ x, torch.zeros(())))
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops._masked_backward.default,
                              (torch.randn(5, 10), x, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, *need), test_utils=checks)


def test_torch_compile_functional():
    x, w, mask, b = sample_inputs((6,), 20, 12, 0.9, requires_grad=True)
    fn = torch.compile(lambda x, w, b: masked_linear(x, w, mask, b).relu().sum(), fullgraph=True, backend="aot_eager")
    out = fn(x, w, b)
    out.backward()
    gw = w.grad.clone()
    w.grad = None
    masked_linear(x, w, mask, b).relu().sum().backward()
    torch.testing.assert_close(gw, w.grad)


SIMD_SCRIPT = """
import torch
from torchslim.ops import masked_linear
from torchslim.ops._reference import ref_masked_linear
torch.manual_seed(0)
for batch in (1, 3, 17, 70):
    for in_f, out_f in ((37, 29), (200, 300)):
        x = torch.randn(batch, in_f, requires_grad=True)
        w = torch.randn(out_f, in_f, requires_grad=True)
        mask = torch.rand(out_f, in_f) > 0.9
        y = masked_linear(x, w, mask)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        yd = ref_masked_linear(xd, wd, mask)
        gxd, gwd = torch.autograd.grad(yd, (xd, wd), g.double())
        for a, b in ((y, yd), (gx, gxd), (gw, gwd)):
            torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("level", ["scalar", "avx2"])
def test_simd_levels_agree(level):
    # The SIMD level is read once per process, so each capped level runs in a subprocess.
    env = dict(os.environ, TORCHSLIM_SIMD=level)
    # The child imports the same torchslim as this process (installed or the source tree).
    package_parent = os.path.dirname(os.path.dirname(torchslim.__file__))
    env["PYTHONPATH"] = os.pathsep.join([package_parent, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SIMD_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99])
def test_cuda_matches_reference(dtype, sparsity):
    x, w, mask, b = sample_inputs((33,), 70, 45, sparsity, torch.float32, device="cuda", requires_grad=True)
    if dtype == torch.float32:
        check_against_reference(x, w, mask, b, {"rtol": 1e-4, "atol": 1e-4})
        return
    xl, wl, bl = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
    want = ref_masked_linear(xl.float(), wl.float(), mask, bl.float())
    got = masked_linear(xl, wl, mask, bl)
    own = ref_masked_linear(xl, wl, mask, bl)
    assert (got.float() - want).abs().max() <= 2 * (own.float() - want).abs().max() + 1e-2
    got.float().sum().backward()
    assert bool((wl.grad[~mask] == 0).all())


@cuda
def test_cuda_structure_ops_and_batch1():
    x, w, mask, b = sample_inputs((1,), 257, 129, 0.9, device="cuda", requires_grad=True)
    check_against_reference(x, w, mask, b, {"rtol": 1e-4, "atol": 1e-4})
    cpu = [t.cpu() for t in ops._masked_structure(mask.cpu())]
    gpu = [t.cpu() for t in ops._masked_structure(mask)]
    for a, c in zip(cpu, gpu):
        assert torch.equal(a, c)
