"""torchslim.ops.sparse_codebook_linear against the float64 reference (decode to dense, then F.linear)."""
import os
import subprocess
import sys

import pytest
import torch

import torchslim

from torchslim.ops import sparse_codebook_linear, sparse_codebook_pack, sparse_codebook_unpack
from torchslim.ops.sparse_codebook_linear import cpu_path as path_of
from torchslim.ops._reference import ref_sparse_codebook_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sample_inputs(device="cpu", dtype=torch.float64, lead=(5,), in_f=37, out_f=11, k=16, density=0.3, packed=None,
                  bias=True, empty_rows=(), seed=0, requires_grad=False):
    """(x, row_ptr, col_idx, codes, codebook, bias, dense weight float64)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (out_f, in_f), generator=gen)
    mask = torch.rand(out_f, in_f, generator=gen) < density
    for r in empty_rows:
        mask[r] = False
    rp, ci, cd = sparse_codebook_pack(labels, mask, k, packed=packed)
    codebook = torch.randn(k, generator=gen, dtype=torch.float64)
    weight = torch.where(mask, codebook[labels], torch.zeros(()))
    x = torch.randn(*lead, in_f, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    tensors = [t.to(device) if t is not None else None for t in (x, rp, ci, cd, codebook.to(dtype), b)]
    if requires_grad:
        for i in (0, 4, 5):
            if tensors[i] is not None:
                tensors[i].requires_grad_()
    return (*tensors, weight.to(device))


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _dense_ref(x, weight, b):
    return torch.nn.functional.linear(x.double(), weight, None if b is None else b.double())


# ---------------------------------------------------------------------------- layout helpers
@pytest.mark.parametrize("k,packed", [(16, True), (16, False), (40, False), (256, False), (3, True)])
def test_pack_unpack_roundtrip_and_reference(k, packed):
    gen = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (9, 23), generator=gen)
    mask = torch.rand(9, 23, generator=gen) < 0.4
    mask[4] = False
    rp, ci, cd = sparse_codebook_pack(labels, mask, k, packed=packed)
    nnz = int(mask.sum())
    assert rp.dtype == torch.int32 and ci.dtype == torch.int16 and cd.dtype == torch.uint8
    assert int(rp[-1]) == nnz and cd.numel() == ((nnz + 1) // 2 if packed else nnz)
    assert rp[5] == rp[4]  # the empty row
    lab, m = sparse_codebook_unpack(rp, ci, cd, 23)
    assert torch.equal(m, mask) and torch.equal(lab[mask], labels[mask].to(torch.uint8))
    # the reference decodes the layout to the same dense weight
    cb = torch.randn(k, dtype=torch.float64, generator=gen)
    x = torch.randn(3, 23, dtype=torch.float64, generator=gen)
    want = x @ torch.where(mask, cb[labels], torch.zeros(())).T
    torch.testing.assert_close(ref_sparse_codebook_linear(x, rp, ci, cd, cb), want)


def test_pack_default_mask_is_nonzero_labels_and_int32_columns():
    labels = torch.tensor([[0, 3, 0, 1], [2, 0, 0, 0]])
    rp, ci, cd = sparse_codebook_pack(labels, None, 4)
    assert rp.tolist() == [0, 2, 3] and ci.tolist() == [1, 3, 0]
    assert cd.tolist() == [3 | (1 << 4), 2]  # packed: entry 0 low nibble, entry 1 high nibble
    wide = torch.zeros(2, 40000, dtype=torch.int64)
    wide[1, 39999] = 5
    rp, ci, cd = sparse_codebook_pack(wide, None, 16, packed=False)
    assert ci.dtype == torch.int32 and ci.tolist() == [39999] and cd.tolist() == [5]


@pytest.mark.parametrize("args,err,msg", [
    ((torch.zeros(3), None, 16), ValueError, "2-D"),
    ((torch.zeros(3, 3), None, 16), TypeError, "integer"),
    ((torch.zeros(3, 3, dtype=torch.long), None, 0), ValueError, "num_clusters"),
    ((torch.zeros(3, 3, dtype=torch.long), None, 300), ValueError, "num_clusters"),
    ((torch.full((3, 3), 20), None, 16), ValueError, r"kept labels must be in \[0, 16\)"),
    ((torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3), 16), TypeError, "keep_mask must be bool"),
    ((torch.zeros(3, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), 16), ValueError, "shape"),
])
def test_pack_bad_arguments(args, err, msg):
    with pytest.raises(err, match=msg):
        sparse_codebook_pack(*args)


def test_pack_refuses_packed_above_16():
    with pytest.raises(ValueError, match="at most 16"):
        sparse_codebook_pack(torch.zeros(2, 2, dtype=torch.long), None, 40, packed=True)


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,packed", [(16, True), (5, True), (16, False), (30, False), (40, False), (256, False)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 17, 70])
def test_forward_matches_reference(device, k, packed, density, batch):
    for dtype in (torch.float32, torch.float64):
        x, rp, ci, cd, cb, b, w = sample_inputs(device, dtype, (batch,), 301, 37, k, density, packed,
                                                empty_rows=(0, 5, 36), seed=batch + int(density * 100) + k)
        got = sparse_codebook_linear(x, rp, ci, cd, cb, b)
        assert got.dtype == dtype and got.shape == (batch, 37)
        torch.testing.assert_close(got.double(), _dense_ref(x, w, b), **_tol(dtype))
        # rows without a kept weight give exactly the bias
        assert torch.equal(got[:, 0], b[0].expand(batch))


@pytest.mark.parametrize("in_f,out_f", [(1, 1), (7, 3), (33, 65), (1000, 19)])
def test_odd_shapes(in_f, out_f):
    for k, packed in ((16, True), (200, False)):
        x, rp, ci, cd, cb, b, w = sample_inputs("cpu", torch.float32, (3,), in_f, out_f, k, 0.6, packed, seed=in_f)
        torch.testing.assert_close(sparse_codebook_linear(x, rp, ci, cd, cb, b).double(), _dense_ref(x, w, b),
                                   **_tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_noncontiguous_and_empty(device):
    x, rp, ci, cd, cb, b, w = sample_inputs(device, torch.float32, (4, 3), 64, 21, 16, 0.3, True)
    got = sparse_codebook_linear(x, rp, ci, cd, cb, b)
    assert got.shape == (4, 3, 21)
    torch.testing.assert_close(got.double(), _dense_ref(x, w, b), **_tol(torch.float32))
    xt = x.transpose(0, 1)  # non-contiguous 3-D input
    assert not xt.is_contiguous()
    torch.testing.assert_close(sparse_codebook_linear(xt, rp, ci, cd, cb, b).double(), _dense_ref(xt, w, b),
                               **_tol(torch.float32))
    xs = torch.randn(64, 16, device=device)[:, ::2].T  # strided rows
    torch.testing.assert_close(sparse_codebook_linear(xs, rp, ci, cd, cb, b).double(), _dense_ref(xs, w, b),
                               **_tol(torch.float32))
    empty = sparse_codebook_linear(x[:0], rp, ci, cd, cb, b)
    assert empty.shape == (0, 3, 21)
    one = sparse_codebook_linear(x[0, 0], rp, ci, cd, cb, b)  # 1-D input
    assert one.shape == (21,)
    torch.testing.assert_close(one.double(), _dense_ref(x[0, 0], w, b), **_tol(torch.float32))


def test_zero_in_and_out_features():
    x = torch.randn(3, 0)
    rp = torch.zeros(5, dtype=torch.int32)
    empty_i16 = torch.zeros(0, dtype=torch.int16)
    empty_u8 = torch.zeros(0, dtype=torch.uint8)
    b = torch.randn(4)
    torch.testing.assert_close(sparse_codebook_linear(x, rp, empty_i16, empty_u8, torch.randn(16), b), b.expand(3, 4))
    y = sparse_codebook_linear(torch.randn(3, 8), torch.zeros(1, dtype=torch.int32), empty_i16, empty_u8,
                               torch.randn(16))
    assert y.shape == (3, 0)


def test_large_layer_runs_the_simd_kernels():
    """Layers large enough that every main loop (32- and 16-wide steps, batch chunks of 64) runs."""
    for k, packed in ((16, True), (16, False), (32, False), (100, False)):
        x, rp, ci, cd, cb, b, w = sample_inputs("cpu", torch.float32, (1,), 2049, 257, k, 0.1, packed, seed=k)
        for batch in (1, 3, 16, 100):
            xb = torch.randn(batch, 2049)
            torch.testing.assert_close(sparse_codebook_linear(xb, rp, ci, cd, cb, b).double(), _dense_ref(xb, w, b),
                                       rtol=1e-4, atol=2e-4)
            name = path_of(k, packed, batch, False)
            assert ("spmm" in name) == (batch >= 4), name
            if torchslim.build_info()["simd"] == "avx512":
                assert name.startswith("avx512"), name


@pytest.mark.parametrize("out_f,in_f", [(3, 40000), (33000, 5)])
def test_int32_columns_and_transposed_rows(out_f, in_f):
    """in_features > 32767: int32 col_idx; out_features > 32767: int32 rows in the transposed structure."""
    for k, packed in ((16, True), (40, False)):
        x, rp, ci, cd, cb, b, w = sample_inputs("cpu", torch.float32, (1,), in_f, out_f, k, 0.05, packed, seed=k)
        assert ci.dtype == (torch.int32 if in_f > 32767 else torch.int16)
        x.requires_grad_()
        for xb in (x, torch.randn(20, in_f, requires_grad=True)):
            y = sparse_codebook_linear(xb, rp, ci, cd, cb, b)
            torch.testing.assert_close(y.double(), _dense_ref(xb.detach(), w, b), rtol=1e-4, atol=1e-4)
            g = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, xb, g)
            torch.testing.assert_close(dx.double(), g.double() @ w, rtol=1e-4, atol=1e-4)
        t_rp, t_row, _ = torch.ops.torchslim._sparse_codebook_transpose(rp, ci, cd, in_f)
        assert t_row.dtype == (torch.int32 if out_f > 32767 else torch.int16)


def test_bfloat16_and_half_inputs_accumulate_in_float32():
    x, rp, ci, cd, cb, b, w = sample_inputs("cpu", torch.float32, (6,), 300, 40, 16, 0.3, True)
    for dtype in (torch.bfloat16, torch.float16):
        xl, cbl, bl = x.to(dtype), cb.to(dtype), b.to(dtype)
        got = sparse_codebook_linear(xl, rp, ci, cd, cbl, bl)
        assert got.dtype == dtype
        ref = _dense_ref(xl, w.to(dtype).double(), bl)
        # flash-attention's rule: at most 2x the error of PyTorch's own low-precision product
        torch_err = (torch.nn.functional.linear(xl, w.to(dtype), bl).double() - ref).abs().max()
        assert (got.double() - ref).abs().max() <= 2 * torch_err + 1e-6


def test_structure_with_rows_starting_mid_byte():
    """Packed codes of the whole layer in CSR order: odd row lengths make rows start on a high nibble."""
    labels = torch.randint(0, 16, (40, 500), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(40, 500, dtype=torch.bool)
    for r in range(40):
        mask[r, torch.randperm(500, generator=torch.Generator().manual_seed(r))[: 2 * r + 1]] = True  # odd lengths
    rp, ci, cd = sparse_codebook_pack(labels, mask, 16)
    assert (rp[1:] % 2 == 1).any()
    cb = torch.randn(16)
    x = torch.randn(2, 500)
    for xb in (x[:1], x, torch.randn(20, 500)):
        want = xb.double() @ torch.where(mask, cb[labels], torch.zeros(())).double().T
        torch.testing.assert_close(sparse_codebook_linear(xb, rp, ci, cd, cb).double(), want, rtol=1e-4, atol=1e-4)


def test_every_simd_path():
    """TORCHSLIM_SIMD caps the run-time choice (read once per process): run each ISA body."""
    code = (
        "import torch\n"
        "from torchslim.ops import sparse_codebook_linear, sparse_codebook_pack\n"
        "g = torch.Generator().manual_seed(1)\n"
        "names = set()\n"
        "for k, packed in [(16, True), (7, True), (16, False), (30, False), (200, False)]:\n"
        "  for batch, in_f, dens in ((1, 3, 1.0), (1, 1031, 0.1), (2, 300, 0.5), (5, 64, 1.0), (20, 333, 0.3), (70, 129, 0.2)):\n"
        "    labels = torch.randint(0, k, (19, in_f), generator=g); mask = torch.rand(19, in_f, generator=g) < dens\n"
        "    mask[3] = False\n"
        "    rp, ci, cd = sparse_codebook_pack(labels, mask, k, packed=packed)\n"
        "    cb = torch.randn(k, generator=g); x = torch.randn(batch, in_f, generator=g); b = torch.randn(19, generator=g)\n"
        "    w = torch.where(mask, cb[labels], torch.zeros(())).double()\n"
        "    got = sparse_codebook_linear(x, rp, ci, cd, cb, b)\n"
        "    torch.testing.assert_close(got.double(), x.double() @ w.T + b.double(), rtol=1e-4, atol=1e-4)\n"
        "    xg = x.clone().requires_grad_(); cg = cb.clone().requires_grad_()\n"
        "    sparse_codebook_linear(xg, rp, ci, cd, cg, b).square().sum().backward()\n"
        "    xr = x.double().requires_grad_(); cr = cb.double().requires_grad_()\n"
        "    wr = torch.where(mask, cr[labels], torch.zeros((), dtype=torch.float64))\n"
        "    (xr @ wr.T + b.double()).square().sum().backward()\n"
        "    torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)\n"
        "    torch.testing.assert_close(cg.grad.double(), cr.grad, rtol=1e-4, atol=1e-3)\n"
        "    from torchslim.ops.sparse_codebook_linear import cpu_path\n"
        "    names.add(cpu_path(k, packed, batch))\n"
        "print(' '.join(sorted(names)))\n"
    )
    procs = {simd: subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TORCHSLIM_SIMD=simd),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for simd in ("scalar", "avx2", "avx512")}
    outs = {}
    for simd, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (simd, err[-3000:])
        outs[simd] = out.split()
    assert outs["scalar"] and all(n.startswith("scalar-") for n in outs["scalar"]), outs["scalar"]
    import torchslim
    level = torchslim.build_info()["simd"]
    if level in ("avx2", "avx512"):
        assert {"avx2-spmv-nibble16", "avx2-spmm-nibble16", "avx2-spmv-byte16", "avx2-spmv-gather",
                "avx2-spmm-gather"} <= set(outs["avx2"]), outs["avx2"]
    if level == "avx512":
        assert {"avx512-spmv-nibble16", "avx512-spmm-nibble16", "avx512-spmv-byte16", "avx512-spmv-byte32",
                "avx512-spmv-gather", "avx512-spmm-byte32", "avx512-spmm-gather"} <= set(outs["avx512"]), outs["avx512"]


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,packed", [(16, True), (40, False)])
@pytest.mark.parametrize("batch", [1, 6])
def test_gradcheck(device, k, packed, batch):
    x, rp, ci, cd, cb, b, _ = sample_inputs(device, torch.float64, (batch,), 23, 9, k, 0.4, packed, empty_rows=(2,),
                                            requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, cb, b: sparse_codebook_linear(x, rp, ci, cd, cb, b), (x, cb, b))
    assert torch.autograd.gradgradcheck(lambda x, b: sparse_codebook_linear(x, rp, ci, cd, cb.detach(), b), (x, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3, 33])
@pytest.mark.parametrize("k,packed,density", [(16, True, 0.1), (16, False, 0.5), (256, False, 0.3), (30, False, 1.0)])
def test_gradients_match_reference(device, batch, k, packed, density):
    x, rp, ci, cd, cb, b, _ = sample_inputs(device, torch.float32, (batch, 2), 301, 45, k, density, packed,
                                            empty_rows=(7,), requires_grad=True)
    lab, mask = sparse_codebook_unpack(rp, ci, cd, 301)
    go = torch.randn(batch, 2, 45, device=device)
    sparse_codebook_linear(x, rp, ci, cd, cb, b).backward(go)
    xr, cr, br = (t.detach().double().requires_grad_() for t in (x, cb, b))
    wr = torch.where(mask, cr[lab.long()], torch.zeros((), dtype=torch.float64, device=device))
    torch.nn.functional.linear(xr, wr, br).backward(go.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cb.grad.double(), cr.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-4, atol=1e-4)
    assert cd.grad is None and ci.grad is None


@pytest.mark.parametrize("batch", [1, 40])
def test_codebook_gradient_is_deterministic_across_thread_counts(batch):
    x, rp, ci, cd, cb, b, _ = sample_inputs("cpu", torch.float32, (batch,), 777, 500, 16, 0.2, True)
    g = torch.randn(batch, 500)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((torch.ops.torchslim.sparse_codebook_linear_grad_codebook(g, x, rp, ci, cd, cb),
                            torch.ops.torchslim.sparse_codebook_linear_grad_input(g, rp, ci, cd, cb, 777)))
    finally:
        torch.set_num_threads(before)
    for dc, dx in results[1:]:
        assert torch.equal(dc, results[0][0]) and torch.equal(dx, results[0][1])


def test_transposed_structure_matches_the_dense_transpose():
    x, rp, ci, cd, cb, b, w = sample_inputs("cpu", torch.float64, (2,), 50, 30, 16, 0.3, True, empty_rows=(4,))
    t_rp, t_row, t_codes = torch.ops.torchslim._sparse_codebook_transpose(rp, ci, cd, 50)
    assert t_rp.shape == (51,) and t_row.dtype == torch.int16 and t_codes.numel() == ci.numel()
    # the transposed structure, read as a [in, out] layer, is W^T
    torch.testing.assert_close(ref_sparse_codebook_linear(torch.eye(30, dtype=torch.float64), t_rp, t_row, t_codes,
                                                          cb), w)
    # rows of each column in increasing order (the fixed summation order of grad_input)
    for j in range(50):
        rows = t_row[t_rp[j]:t_rp[j + 1]]
        assert torch.all(rows[1:] > rows[:-1])


# ---------------------------------------------------------------------------- opcheck / compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed,k,bias", [(True, 16, True), (False, 256, False), (False, 20, True)])
def test_opcheck(device, packed, k, bias):
    x, rp, ci, cd, cb, b, _ = sample_inputs(device, torch.float32, (4,), 19, 6, k, 0.5, packed, bias=bias,
                                            requires_grad=True)
    torch.library.opcheck(torch.ops.torchslim.sparse_codebook_linear.default, (x, rp, ci, cd, cb, b))
    g = torch.randn(4, 6, device=device)
    torch.library.opcheck(torch.ops.torchslim.sparse_codebook_linear_grad_input.default,
                          (g, rp, ci, cd, cb.detach(), 19))
    torch.library.opcheck(torch.ops.torchslim.sparse_codebook_linear_grad_codebook.default,
                          (g, x.detach(), rp, ci, cd, cb.detach()))
    torch.library.opcheck(torch.ops.torchslim._sparse_codebook_transpose.default, (rp, ci, cd, 19))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, rp, ci, cd, cb, b, _ = sample_inputs(device, torch.float32, (5, 2), 33, 12, 16, 0.3, True, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, cb, b):
        return torch.relu(sparse_codebook_linear(x, rp, ci, cd, cb, b)).square().sum()

    step(x, cb, b).backward()
    lab, mask = sparse_codebook_unpack(rp, ci, cd, 33)
    xr, cr, br = (t.detach().double().requires_grad_() for t in (x, cb, b))
    wr = torch.where(mask, cr[lab.long()], torch.zeros((), dtype=torch.float64, device=device))
    torch.relu(torch.nn.functional.linear(xr, wr, br)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cb.grad.double(), cr.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- bad input
def _good():
    x, rp, ci, cd, cb, b, _ = sample_inputs("cpu", torch.float32, (2,), 10, 4, 7, 0.5, False, seed=11)
    return dict(input=x, row_ptr=rp, col_idx=ci, codes=cd, codebook=cb, bias=b)


def _edit(case):
    a = _good()
    nnz = a["col_idx"].numel()
    if case == "code_range":
        a["codes"] = a["codes"].clone(); a["codes"][nnz - 1] = 7
    elif case == "code_range_packed":
        x, rp, ci, cd, cb, b, _ = sample_inputs("cpu", torch.float32, (2,), 10, 4, 16, 0.5, True, seed=11)
        cd = cd.clone(); cd[0] = 0xF1  # entry 0 = 1, entry 1 = 15
        a.update(row_ptr=rp, col_idx=ci, codes=cd, codebook=cb[:9])
    elif case == "col_range":
        a["col_idx"] = a["col_idx"].clone(); a["col_idx"][1] = 10
    elif case == "col_negative":
        a["col_idx"] = a["col_idx"].clone(); a["col_idx"][0] = -1
    elif case == "row_ptr_decreasing":
        a["row_ptr"] = a["row_ptr"].clone(); a["row_ptr"][2] = a["row_ptr"][3] + 1
    elif case == "row_ptr_start":
        a["row_ptr"] = a["row_ptr"].clone(); a["row_ptr"][0] = 1
    elif case == "row_ptr_end":
        a["row_ptr"] = a["row_ptr"].clone(); a["row_ptr"][-1] -= 1
    elif case == "row_ptr_int64":
        a["row_ptr"] = a["row_ptr"].long()
    elif case == "col_float":
        a["col_idx"] = a["col_idx"].float()
    elif case == "col_int64":
        a["col_idx"] = a["col_idx"].long()
    elif case == "codes_int8":
        a["codes"] = a["codes"].to(torch.int8)
    elif case == "codes_length":
        a["codes"] = a["codes"][:-2].clone()
    elif case == "codebook_too_long_packed":
        a["codes"] = torch.zeros((nnz + 1) // 2, dtype=torch.uint8); a["codebook"] = torch.randn(17)
    elif case == "codebook_too_long":
        a["codebook"] = torch.randn(257)
    elif case == "codebook_empty":
        a["codebook"] = torch.randn(0)
    elif case == "codebook_2d":
        a["codebook"] = torch.randn(7, 1)
    elif case == "codebook_dtype":
        a["codebook"] = a["codebook"].double()
    elif case == "input_int":
        a["input"] = torch.ones(2, 10, dtype=torch.long)
    elif case == "bias_len":
        a["bias"] = torch.randn(5)
    elif case == "bias_dtype":
        a["bias"] = a["bias"].double()
    elif case == "col_noncontiguous":
        a["col_idx"] = torch.stack((a["col_idx"], a["col_idx"]), 1)[:, 0]
    elif case == "codes_noncontiguous":
        a["codes"] = torch.stack((a["codes"], a["codes"]), 1)[:, 0]
    elif case == "in_features":
        a["input"] = torch.randn(2, 3)  # columns up to 9 are out of range for in_features 3
    return a


BAD_CASES = {
    "code_range": (RuntimeError, r"codes entry \d+ is 7 but codebook has only 7 entries"),
    "code_range_packed": (RuntimeError, "codes entry 1 is 15 but codebook has only 9 entries"),
    "col_range": (RuntimeError, r"col_idx entry 1 is 10, outside \[0, in_features = 10\)"),
    "col_negative": (RuntimeError, r"col_idx entry 0 is -1, outside"),
    "row_ptr_decreasing": (RuntimeError, "row_ptr must be non-decreasing, but it decreases after row"),
    "row_ptr_start": (RuntimeError, "row_ptr must start at 0, got 1"),
    "row_ptr_end": (RuntimeError, "row_ptr must end at nnz"),
    "row_ptr_int64": (TypeError, "row_ptr must be int32"),
    "col_float": (TypeError, "col_idx must be int16 or int32"),
    "col_int64": (TypeError, "col_idx must be int16 or int32"),
    "codes_int8": (TypeError, "codes must be uint8"),
    "codes_length": (RuntimeError, r"codes must have nnz = \d+ entries \(uint8\) or ceil\(nnz / 2\)"),
    "codebook_too_long_packed": (RuntimeError, "addresses at most 16 codebook entries, but codebook has 17"),
    "codebook_too_long": (RuntimeError, "codebook has 257 entries but uint8 codes address at most 256"),
    "codebook_empty": (RuntimeError, "codebook is empty"),
    "codebook_2d": (RuntimeError, "codebook must be 1-D"),
    "codebook_dtype": (TypeError, "codebook dtype torch.float64 differs from input dtype torch.float32"),
    "input_int": (TypeError, "input must be floating point"),
    "bias_len": (RuntimeError, r"bias must have shape \[4\]"),
    "bias_dtype": (RuntimeError, "bias dtype"),
    "col_noncontiguous": (RuntimeError, "col_idx must be contiguous"),
    "codes_noncontiguous": (RuntimeError, "codes must be contiguous"),
    "in_features": (RuntimeError, r"outside \[0, in_features = 3\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_arguments_raise_clear_errors(case):
    err, msg = BAD_CASES[case]
    a = _edit(case)
    with pytest.raises(err, match=msg):
        sparse_codebook_linear(**a)
    if err is not TypeError:  # the raw op (no Python pre-checks) refuses it too, before reading memory
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.torchslim.sparse_codebook_linear(*a.values())


def test_structure_checks_in_backward_ops():
    a = _edit("col_range")
    g = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="col_idx entry 1 is 10"):
        torch.ops.torchslim.sparse_codebook_linear_grad_input(g, a["row_ptr"], a["col_idx"], a["codes"],
                                                              a["codebook"], 10)
    with pytest.raises(RuntimeError, match="col_idx entry 1 is 10"):
        torch.ops.torchslim.sparse_codebook_linear_grad_codebook(g, a["input"], a["row_ptr"], a["col_idx"],
                                                                 a["codes"], a["codebook"])
    with pytest.raises(RuntimeError, match=r"grad_output.shape\[-1\] must be out_features = 4"):
        torch.ops.torchslim.sparse_codebook_linear_grad_input(torch.randn(2, 5), *_good_structure(), 10)


def _good_structure():
    a = _good()
    return a["row_ptr"], a["col_idx"], a["codes"], a["codebook"]


def test_edited_structure_is_checked_again():
    """Validation is memoised per structure, keyed on the tensors' version: an in-place edit is caught."""
    a = _good()
    sparse_codebook_linear(**a)
    a["codes"][0] = 200
    with pytest.raises(RuntimeError, match="codes entry 0 is 200"):
        sparse_codebook_linear(**a)
    a["codes"][0] = 1
    a["col_idx"][0] = 99
    with pytest.raises(RuntimeError, match="col_idx entry 0 is 99"):
        sparse_codebook_linear(**a)


def test_transposed_cache_follows_edits():
    """grad_input's cached transposed structure is rebuilt after an in-place edit of the codes."""
    x, rp, ci, cd, cb, b, _ = sample_inputs("cpu", torch.float64, (3,), 20, 8, 16, 0.5, False)
    g = torch.randn(3, 8, dtype=torch.float64)
    first = torch.ops.torchslim.sparse_codebook_linear_grad_input(g, rp, ci, cd, cb, 20)
    cd.copy_((cd + 1) % 16)
    second = torch.ops.torchslim.sparse_codebook_linear_grad_input(g, rp, ci, cd, cb, 20)
    lab, mask = sparse_codebook_unpack(rp, ci, cd, 20)
    want = g @ torch.where(mask, cb[lab.long()], torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(second, want)
    assert not torch.allclose(first, second)


def test_python_type_errors():
    a = _good()
    with pytest.raises(TypeError, match="row_ptr must be a torch.Tensor"):
        sparse_codebook_linear(a["input"], [0, 1], a["col_idx"], a["codes"], a["codebook"])
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        sparse_codebook_linear(a["input"], a["row_ptr"], a["col_idx"], a["codes"], a["codebook"], 1.0)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        sparse_codebook_linear(torch.tensor(1.0), a["row_ptr"], a["col_idx"], a["codes"], a["codebook"])


@needs_cuda
def test_device_mismatch_raises():
    a = _good()
    a["codebook"] = a["codebook"].cuda()
    with pytest.raises(RuntimeError, match="codebook is on cuda"):
        torch.ops.torchslim.sparse_codebook_linear(*a.values())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    x, rp, ci, cd, cb, b, w = sample_inputs("cuda", torch.float32, (9,), 300, 40, 16, 0.3, True)
    xl, cbl, bl = x.to(dtype), cb.to(dtype), b.to(dtype)
    got = sparse_codebook_linear(xl, rp, ci, cd, cbl, bl)
    ref = _dense_ref(xl, w.to(dtype).double(), bl)
    torch_err = (torch.nn.functional.linear(xl, w.to(dtype), bl).double() - ref).abs().max()
    assert (got.double() - ref).abs().max() <= 2 * torch_err + 1e-6


@needs_cuda
def test_cuda_codebook_gradient_is_deterministic():
    x, rp, ci, cd, cb, b, _ = sample_inputs("cuda", torch.float32, (33,), 700, 300, 16, 0.2, True)
    g = torch.randn(33, 300, device="cuda")
    first = torch.ops.torchslim.sparse_codebook_linear_grad_codebook(g, x, rp, ci, cd, cb)
    for _ in range(3):
        assert torch.equal(torch.ops.torchslim.sparse_codebook_linear_grad_codebook(g, x, rp, ci, cd, cb), first)
