"""torchslim.ops.codebook_linear against the float64 reference input @ codebook[indices].T + bias."""
import subprocess
import sys
import os

import pytest
import torch

from torchslim.ops import codebook_linear
from torchslim.ops._reference import pack_int4, ref_codebook_linear, unpack_int4

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sample_inputs(device="cpu", dtype=torch.float64, lead=(5,), in_f=37, out_f=11, k=16, packed=False, bias=True,
                  requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (out_f, in_f), generator=gen).to(torch.uint8)
    indices = pack_int4(idx) if packed else idx
    codebook = torch.randn(k, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(*lead, in_f, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    x, indices, codebook = x.to(device), indices.to(device), codebook.to(device)
    b = b.to(device) if b is not None else None
    if requires_grad:
        x.requires_grad_()
        codebook.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return x, indices, codebook, b, idx.to(device)


def _ref(x, idx, codebook, b):
    return ref_codebook_linear(x.double(), idx, codebook.double(), None if b is None else b.double())


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,packed", [(1, False), (2, True), (2, False), (16, True), (16, False), (17, False),
                                      (32, False), (33, False), (256, False), (5, True)])
@pytest.mark.parametrize("batch", [1, 3, 9, 40])
@pytest.mark.parametrize("in_f", [1, 31, 97, 300])
def test_forward_matches_reference(device, k, packed, batch, in_f):
    for dtype in (torch.float32, torch.float64):
        x, ind, cb, b, idx = sample_inputs(device, dtype, (batch,), in_f, 13, k, packed, seed=batch * 7 + in_f)
        got = codebook_linear(x, ind, cb, b)
        assert got.dtype == dtype and got.shape == (batch, 13)
        torch.testing.assert_close(got.double(), _ref(x, idx, cb, b), **_tol(dtype))


@pytest.mark.slow
def test_every_simd_path():
    """The kernel picks its SIMD body at run time; TORCHSLIM_SIMD caps it (read once per process)."""
    code = (
        "import torch\n"
        "from torchslim.ops import codebook_linear\n"
        "from torchslim.ops._reference import pack_int4, ref_codebook_linear\n"
        "g = torch.Generator().manual_seed(1)\n"
        "for k, packed in [(16, True), (7, True), (16, False), (30, False), (200, False), (256, False)]:\n"
        "  for batch, in_f in ((1, 3), (1, 131), (2, 33), (5, 64), (8, 16), (20, 33)):\n"
        "    if True:\n"
        "      idx = torch.randint(0, k, (19, in_f), generator=g).to(torch.uint8)\n"
        "      cb = torch.randn(k, generator=g); x = torch.randn(batch, in_f, generator=g); b = torch.randn(19, generator=g)\n"
        "      got = codebook_linear(x, pack_int4(idx) if packed else idx, cb, b)\n"
        "      torch.testing.assert_close(got.double(), ref_codebook_linear(x.double(), idx, cb.double(), b.double()),"
        " rtol=1e-4, atol=1e-4)\n"
        "      xg = x.clone().requires_grad_(); cg = cb.clone().requires_grad_()\n"
        "      codebook_linear(xg, pack_int4(idx) if packed else idx, cg, b).sum().backward()\n"
        "      xr = x.double().requires_grad_(); cr = cb.double().requires_grad_()\n"
        "      ref_codebook_linear(xr, idx, cr, b.double()).sum().backward()\n"
        "      torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)\n"
        "      torch.testing.assert_close(cg.grad.double(), cr.grad, rtol=1e-4, atol=1e-3)\n"
        "import torchslim; print(torchslim.build_info()['simd'])\n"
    )
    # The AVX-512 body (when the CPU has it) runs in this process; scalar and AVX2 run in two
    # child processes at once.
    procs = {simd: subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TORCHSLIM_SIMD=simd),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for simd in ("scalar", "avx2")}
    exec(compile(code, "<simd-check>", "exec"), {})
    for simd, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (simd, err[-3000:])
        assert out.split()[-1] in (simd, "scalar"), out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_f", [1, 2, 7, 33, 64])
def test_packed_and_unpacked_agree(device, in_f):
    x, ind, cb, b, idx = sample_inputs(device, torch.float32, (4,), in_f, 9, 16, packed=True, seed=in_f)
    torch.testing.assert_close(codebook_linear(x, ind, cb, b), codebook_linear(x, idx, cb, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(unpack_int4(ind, in_f), idx)


@pytest.mark.parametrize("device", DEVICES)
def test_odd_packed_padding_nibble_is_ignored(device):
    """The unused high nibble of an odd row's last byte may hold anything."""
    x, ind, cb, b, idx = sample_inputs(device, torch.float64, (3,), 9, 6, 4, packed=True)
    dirty = ind.clone()
    dirty[:, -1] |= 0xF0
    torch.testing.assert_close(codebook_linear(x, dirty, cb, b), _ref(x, idx, cb, b))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_noncontiguous_empty(device):
    x, ind, cb, b, idx = sample_inputs(device, torch.float32, (2, 3, 4), 21, 10, 16, packed=True)
    got = codebook_linear(x, ind, cb, b)
    assert got.shape == (2, 3, 4, 10)
    torch.testing.assert_close(got.double(), _ref(x, idx, cb, b), rtol=1e-4, atol=1e-4)
    # non-contiguous input, indices and codebook
    xt = x.transpose(0, 2)
    big = torch.zeros(10, 42, dtype=torch.uint8, device=device)
    big[:, ::2] = idx
    idx_nc = big[:, ::2]
    cb_nc = torch.stack([cb, cb * 0 + 5], 1)[:, 0]
    assert not xt.is_contiguous() and not idx_nc.is_contiguous() and not cb_nc.is_contiguous()
    torch.testing.assert_close(codebook_linear(xt, idx_nc, cb_nc, b).double(), _ref(xt, idx, cb, b),
                               rtol=1e-4, atol=1e-4)
    # empty batch, with and without grad
    for lead in [(0,), (3, 0)]:
        xe = torch.randn(*lead, 21, device=device, requires_grad=True)
        cbe = cb.clone().requires_grad_()
        y = codebook_linear(xe, ind, cbe, b)
        assert y.shape == (*lead, 10)
        y.sum().backward()
        assert xe.grad.shape == xe.shape and torch.equal(cbe.grad, torch.zeros_like(cb))
    # 1-D input
    torch.testing.assert_close(codebook_linear(x[0, 0, 0], ind, cb, b).double(), _ref(x[0, 0, 0], idx, cb, b),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_large_layer_both_paths(device):
    """A layer big enough for several decode tiles, in the GEMV and the decode+GEMM regime."""
    for batch in (1, 4, 64):
        x, ind, cb, b, idx = sample_inputs(device, torch.float32, (batch,), 1500, 1500, 16, packed=True, seed=batch)
        torch.testing.assert_close(codebook_linear(x, ind, cb, b).double(), _ref(x, idx, cb, b), rtol=1e-4,
                                   atol=2e-4)
        x, ind, cb, b, idx = sample_inputs(device, torch.float32, (batch,), 1500, 1500, 256, seed=batch)
        torch.testing.assert_close(codebook_linear(x, ind, cb, b).double(), _ref(x, idx, cb, b), rtol=1e-4,
                                   atol=2e-4)


def test_bfloat16_on_cpu():
    x, ind, cb, b, idx = sample_inputs("cpu", torch.bfloat16, (6,), 40, 7, 16, packed=True)
    got = codebook_linear(x, ind, cb, b)
    assert got.dtype == torch.bfloat16
    want = _ref(x, idx, cb, b)
    composite = ref_codebook_linear(x, idx, cb, b).double()
    assert (got.double() - want).abs().max() <= 2 * (composite - want).abs().max() + 1e-2


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,packed,in_f", [(1, False, 5), (2, True, 7), (16, True, 8), (17, False, 6),
                                           (256, False, 9), (16, False, 4)])
def test_gradcheck(device, k, packed, in_f):
    for bias in (True, False):
        x, ind, cb, b, _ = sample_inputs(device, torch.float64, (2, 3), in_f, 4, k, packed, bias=bias,
                                         requires_grad=True, seed=k)
        args = (x, cb) + ((b,) if bias else ())
        fn = (lambda x, c, b: codebook_linear(x, ind, c, b)) if bias else (lambda x, c: codebook_linear(x, ind, c))
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("k,packed", [(16, True), (200, False)])
def test_gradients_match_reference(device, batch, k, packed):
    x, ind, cb, b, idx = sample_inputs(device, torch.float32, (batch,), 70, 300, k, packed, requires_grad=True,
                                       seed=batch)
    gy = torch.randn(batch, 300, device=device)
    codebook_linear(x, ind, cb, b).backward(gy)
    xr, cr, br = (t.detach().double().requires_grad_() for t in (x, cb, b))
    _ref(xr, idx, cr, br).backward(gy.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cb.grad.double(), cr.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [3, 40])
def test_cpu_codebook_gradient_is_deterministic_across_thread_counts(batch, dtype):
    """Per-block partial histograms of fixed size, summed in block order: bit-equal results
    on 1, 2, 3 and 4 threads, in deterministic mode. 150 rows are 10 blocks of 16, split
    across the threads (at::parallel_for, grain 1 block); batch 3 runs the fused kernel, batch
    40 the tiled one. float64 keeps the rounding of the sums visible: a reduction whose
    order followed the thread count would differ in the last bits."""
    x, ind, cb, b, idx = sample_inputs("cpu", dtype, (batch,), 200, 150, 256, requires_grad=True)
    gy = torch.randn(batch, 150, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    grads = []
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 3, 4, 1):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            cb.grad = None
            codebook_linear(x, ind, cb, b).backward(gy)
            grads.append(cb.grad.clone())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    for n, g in zip((2, 3, 4, 1), grads[1:]):
        assert torch.equal(grads[0], g), f"codebook gradient on {n} threads differs from 1 thread"
    cr = cb.detach().double().requires_grad_()
    _ref(x.detach(), idx, cr, b.detach()).backward(gy.double())
    torch.testing.assert_close(grads[0].double(), cr.grad, **_tol(dtype))  # equal, and right


# (requires grad: input, codebook, bias); the indices never do (uint8 cannot)
GRAD_SETS = [(True, False, False), (False, True, False), (False, False, True), (True, True, False),
             (False, True, True), (True, True, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("want", GRAD_SETS)
def test_indices_get_no_gradient_and_only_requested_grads(device, want, ops_ran):
    """Gradients reach exactly the tensors that require them, with the reference's values,
    and a backward kernel runs only for a gradient that was asked for; the indices are data:
    uint8 cannot require grad and a floating "indices" tensor is refused."""
    x, ind, cb, b, idx = sample_inputs(device, torch.float64, (3, 2), 10, 5, 16, True)
    leaves = (x, cb, b)
    for t, w in zip(leaves, want):
        t.requires_grad_(w)
    y = codebook_linear(x, ind, cb, b)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    ran = ops_ran(lambda: y.backward(gy))
    assert ("torchslim::codebook_linear_grad_input" in ran) == want[0], ran
    assert ("torchslim::codebook_linear_grad_codebook" in ran) == want[1], ran
    refs = [t.detach().clone().requires_grad_(w) for t, w in zip(leaves, want)]
    _ref(refs[0], idx, refs[1], refs[2]).backward(gy)
    for name, t, r, w in zip(("input", "codebook", "bias"), leaves, refs, want):
        if w:
            assert t.grad is not None, name
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-10, atol=1e-10, msg=name)
        else:
            assert t.grad is None, f"{name} got a gradient it did not ask for"
    assert not ind.requires_grad and ind.grad is None
    with pytest.raises(RuntimeError, match="floating point"):
        ind.requires_grad_()
    with pytest.raises(TypeError, match="indices"):
        codebook_linear(x, ind.double().requires_grad_(), cb, b)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_codebook_gradient_sums_over_layers(device):
    gen = torch.Generator().manual_seed(3)
    cb = torch.randn(16, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    i1 = torch.randint(0, 16, (6, 8), generator=gen).to(torch.uint8).to(device)
    i2 = torch.randint(0, 16, (4, 6), generator=gen).to(torch.uint8).to(device)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64).to(device)
    codebook_linear(codebook_linear(x, pack_int4(i1), cb), i2, cb).square().sum().backward()
    cr = cb.detach().clone().requires_grad_()
    ref_codebook_linear(ref_codebook_linear(x, i1, cr), i2, cr).square().sum().backward()
    torch.testing.assert_close(cb.grad, cr.grad)


# ---------------------------------------------------------------------------- opcheck / compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed,k,bias", [(True, 16, True), (False, 256, False), (True, 3, False)])
def test_opcheck(device, packed, k, bias):
    x, ind, cb, b, _ = sample_inputs(device, torch.float32, (4,), 9, 6, k, packed, bias=bias, requires_grad=True)
    torch.library.opcheck(torch.ops.torchslim.codebook_linear.default, (x, ind, cb, b))
    g = torch.randn(4, 6, device=device)
    torch.library.opcheck(torch.ops.torchslim.codebook_linear_grad_input.default, (g, ind, cb.detach(), 9))
    torch.library.opcheck(torch.ops.torchslim.codebook_linear_grad_codebook.default,
                          (g, x.detach(), ind, cb.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, ind, cb, b, idx = sample_inputs(device, torch.float32, (5, 2), 33, 12, 16, True, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, cb, b):
        return torch.relu(codebook_linear(x, ind, cb, b)).square().sum()

    step(x, cb, b).backward()
    xr, cr, br = (t.detach().double().requires_grad_() for t in (x, cb, b))
    torch.relu(_ref(xr, idx, cr, br)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cb.grad.double(), cr.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- bad input
BAD_CASES = {
    "index_range": "indices contain the value",
    "index_range_packed": "indices contain the value",
    "packed_k": "at most 16",
    "k_above_256": "at most 256",
    "indices_float": "uint8",
    "indices_int64": "uint8",
    "indices_1d": "2-D",
    "empty_codebook": "empty",
    "codebook_2d": "1-D",
    "codebook_int": "floating point",
    "in_features": "columns",
    "bias_len": "bias",
    "bias_dtype": "bias dtype",
    "dtype_mix": "codebook dtype",
    "input_int": "floating point",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_arguments_raise_clear_errors(case):
    x, ind, cb, b, idx = sample_inputs("cpu", torch.float32, (2,), 10, 4, 7)
    if case == "index_range":
        ind = idx.clone()
        ind[3, 9] = 7
    elif case == "index_range_packed":
        bad = idx.clone()
        bad[1, 4] = 9
        ind = pack_int4(bad)
    elif case == "packed_k":
        cb = torch.randn(17)
        ind = pack_int4(idx)
    elif case == "k_above_256":
        cb = torch.randn(257)
    elif case == "indices_float":
        ind = idx.float()
    elif case == "indices_int64":
        ind = idx.long()
    elif case == "indices_1d":
        ind = idx.reshape(-1)
    elif case == "empty_codebook":
        cb = torch.randn(0)
    elif case == "codebook_2d":
        cb = cb.reshape(1, -1)
    elif case == "codebook_int":
        cb = torch.randint(0, 5, (7,))
    elif case == "in_features":
        x = torch.randn(2, 13)
    elif case == "bias_len":
        b = torch.randn(5)
    elif case == "bias_dtype":
        b = b.double()
    elif case == "dtype_mix":
        x = x.double()
    elif case == "input_int":
        x = torch.randint(0, 3, (2, 10))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=BAD_CASES[case]):
        codebook_linear(x, ind, cb, b)
    # the raw op checks too (C++ TORCH_CHECK), not only the Python wrapper
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        torch.ops.torchslim.codebook_linear(x, ind, cb, b)


def test_index_range_checked_in_backward_ops():
    g = torch.randn(2, 4)
    idx = torch.full((4, 10), 9, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="indices contain the value 9"):
        torch.ops.torchslim.codebook_linear_grad_input(g, idx, torch.randn(5), 10)
    with pytest.raises(RuntimeError, match="indices contain the value 9"):
        torch.ops.torchslim.codebook_linear_grad_codebook(g, torch.randn(2, 10), idx, torch.randn(5))


@needs_cuda
def test_device_mismatch_raises():
    x, ind, cb, b, _ = sample_inputs("cpu", torch.float32, (2,), 10, 4, 7)
    with pytest.raises(RuntimeError, match="on"):
        codebook_linear(x.cuda(), ind, cb.cuda(), b.cuda())
    with pytest.raises(RuntimeError, match="on"):
        codebook_linear(x.cuda(), ind.cuda(), cb, b.cuda())


# ---------------------------------------------------------------------------- CUDA only
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 100])
def test_cuda_low_precision(dtype, batch):
    x, ind, cb, b, idx = sample_inputs("cuda", dtype, (batch,), 130, 70, 16, packed=True, requires_grad=True)
    y = codebook_linear(x, ind, cb, b)
    want = _ref(x.detach(), idx, cb.detach(), b.detach())
    composite = ref_codebook_linear(x.detach(), idx, cb.detach(), b.detach()).double()
    err, err_c = (y.detach().double() - want).abs().max(), (composite - want).abs().max()
    assert err <= 2 * err_c + 1e-2
    y.float().sum().backward()
    assert x.grad.dtype == dtype and cb.grad.dtype == dtype and torch.isfinite(cb.grad.float()).all()


@needs_cuda
@pytest.mark.parametrize("batch", [2, 50])
def test_cuda_deterministic_codebook_gradient(batch):
    x, ind, cb, b, idx = sample_inputs("cuda", torch.float32, (batch,), 300, 200, 256, requires_grad=True)
    gy = torch.randn(batch, 200, device="cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        grads = []
        for _ in range(3):
            cb.grad = None
            codebook_linear(x, ind, cb, b).backward(gy)
            grads.append(cb.grad.clone())
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    xr, cr = x.detach().double(), cb.detach().double().requires_grad_()
    _ref(xr, idx, cr, None).backward(gy.double())
    torch.testing.assert_close(grads[0].double(), cr.grad, rtol=1e-4, atol=1e-3)
