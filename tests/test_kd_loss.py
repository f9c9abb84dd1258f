"""Tests for the fused distillation loss torchslim.ops.kd_kl_div and torchslim.nn.KDLoss."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torchslim
from torchslim.nn import KDLoss
from torchslim.ops import kd_kl_div
from torchslim.ops._reference import ref_kd_kl_div

REDUCTIONS = ["batchmean", "sum", "mean", "none"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (rows..., C): odd sizes, one class, several 1024-class blocks with a tail, an empty batch.
SHAPES = [(5, 7), (3, 4, 33), (2, 2500), (1, 1), (6, 1), (0, 5), (4, 17, 3)]


def sample_inputs(shape, device="cpu", dtype=torch.float64, scale=3.0, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return s.requires_grad_(requires_grad), t


def ref_with_grad(s, t, temperature, reduction, grad_out=None):
    """float64 reference loss and its autograd gradient w.r.t. the student."""
    s64 = s.detach().double().requires_grad_()
    out = ref_kd_kl_div(s64, t.detach().double(), temperature, reduction)
    g = torch.ones_like(out) if grad_out is None else grad_out.double()
    (gs,) = torch.autograd.grad(out, s64, g) if s64.numel() else (torch.zeros_like(s64),)
    return out.detach(), gs


def assert_within_composite_error(got, want, composite, slack=1e-5, elementwise=True):
    """flash-attention's rule: our error <= 2x PyTorch's own low-precision error (+ slack),
    per element (losses) or for the largest error of the tensor (gradients)."""
    err = (got.double() - want).abs()
    err_composite = (composite.double() - want).abs()
    if not elementwise:
        err, err_composite, want = err.max(), err_composite.max(), want.abs().max()
    bound = 2 * err_composite + slack * (1 + want.abs())
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g} vs composite {err_composite.max().item():.3g}"


# ---------------------------------------------------------------- forward and gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_matches_reference(device, shape, reduction):
    for temperature in (0.5, 1.0, 4.0):
        s, t = sample_inputs(shape, device, requires_grad=True, seed=len(shape) + shape[-1])
        out = kd_kl_div(s, t, temperature, reduction)
        grad_out = torch.randn(out.shape, dtype=torch.float64, device=device) if reduction == "none" else None
        want, want_grad = ref_with_grad(s, t, temperature, reduction, grad_out)
        torch.testing.assert_close(out, want.to(device), rtol=1e-10, atol=1e-12)
        assert out.shape == want.shape and out.dtype == torch.float64
        if s.numel():
            (gs,) = torch.autograd.grad(out, s, grad_out)
            torch.testing.assert_close(gs, want_grad.to(device), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0, 100.0])
def test_float32_within_composite_error(device, reduction, temperature):
    for shape, scale in (((16, 1000), 3.0), ((5, 2049), 10.0), ((33, 10), 1.0)):
        s, t = sample_inputs(shape, device, torch.float32, scale, requires_grad=True, seed=shape[0])
        out = kd_kl_div(s, t, temperature, reduction)
        want, want_grad = ref_with_grad(s, t, temperature, reduction)
        composite = ref_kd_kl_div(s.detach(), t, temperature, reduction)
        assert out.dtype == torch.float32
        assert_within_composite_error(out.cpu(), want.cpu(), composite.cpu())
        (gs,) = torch.autograd.grad(out.sum(), s)
        s32 = s.detach().requires_grad_()
        (gc,) = torch.autograd.grad(ref_kd_kl_div(s32, t, temperature, reduction).sum(), s32)
        assert_within_composite_error(gs.cpu(), want_grad.cpu(), gc.cpu(), slack=1e-7, elementwise=False)


def test_multithreaded_rows_match_reference():
    # Enough rows for several parallel_for chunks on any thread count.
    s, t = sample_inputs((700, 300), dtype=torch.float32, requires_grad=True, seed=3)
    out = kd_kl_div(s, t, 2.0, "none")
    want, _ = ref_with_grad(s, t, 2.0, "none")
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_gradient_streamed(dtype):
    # >= 16 MiB of gradient: written with streaming stores; odd C puts rows on every alignment.
    rows, classes = (33, 127_001) if dtype == torch.float32 else (65, 129_001)
    s, t = sample_inputs((rows, classes), dtype=dtype, requires_grad=True, seed=2)
    out = kd_kl_div(s, t, 2.0, "sum")
    (g,) = torch.autograd.grad(out, s)
    s32 = s.detach().float().requires_grad_()
    want = ref_kd_kl_div(s32, t.float(), 2.0, "sum")
    (gw,) = torch.autograd.grad(want, s32)
    torch.testing.assert_close(out.float(), want, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)
    torch.testing.assert_close(g.float(), gw, rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-6)


def test_backward_scales_saved_gradient():
    s, t = sample_inputs((6, 40), requires_grad=True, seed=4)
    loss = kd_kl_div(s, t, 3.0)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    torch.testing.assert_close(g3, 3 * g1)
    loss.backward(retain_graph=True)
    loss.backward()  # a second backward through the retained graph adds the same gradient
    torch.testing.assert_close(s.grad, 2 * g1)
    _, want = ref_with_grad(s, t, 3.0, "batchmean")
    torch.testing.assert_close(g1, want)


def test_gradcheck_float64():
    for reduction in REDUCTIONS:
        s, t = sample_inputs((3, 5), requires_grad=True, seed=5)
        assert torch.autograd.gradcheck(lambda x: kd_kl_div(x, t, 2.0, reduction), (s,))
        w = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda x: kd_kl_div(x, t, 0.7, reduction, row_weight=w), (s,))
    s, t = sample_inputs((2, 3, 4), requires_grad=True, seed=6)
    assert torch.autograd.gradcheck(lambda x: kd_kl_div(x, t, 1.5, "none"), (s,))


def test_opcheck():
    op = torch.ops.torchslim.kd_kl_div_fwd
    s, t = sample_inputs((4, 9), requires_grad=True, seed=7)
    w = torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    s32, t32 = sample_inputs((2, 3, 11), dtype=torch.float32, seed=8)
    torch.library.opcheck(op, (s, t, 2.0, 3, None, True))
    torch.library.opcheck(op, (s, t, 0.5, 0, w, True))
    torch.library.opcheck(op, (s32, t32, 1.0, 1, None, False))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()

    def step(s, t, w):
        loss = kd_kl_div(s, t, 2.0, reduction, row_weight=w)
        return loss.sum() * 1.5 if reduction == "none" else loss

    s, t = sample_inputs((5, 13), dtype=torch.float32, requires_grad=True, seed=9)
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(s, t, w)
    (g,) = torch.autograd.grad(out, s)
    eager = step(s, t, w)
    (ge,) = torch.autograd.grad(eager, s)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, ge)


# ---------------------------------------------------------------- row weights / ignored rows


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_count_for_nothing(reduction):
    s, t = sample_inputs((4, 6, 10), requires_grad=True, seed=10)
    target = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(1))
    target[0, :3] = -100
    target[2, 5] = -100
    keep = target != -100
    with torch.no_grad():  # padding rows may hold anything
        s[~keep] = float("nan")
    out = kd_kl_div(s, t, 2.0, reduction, target=target)
    kept_s = s.detach()[keep].requires_grad_()
    want = ref_kd_kl_div(kept_s, t[keep], 2.0, "none")
    if reduction == "none":
        assert out.shape == (4, 6)
        assert bool((out[~keep] == 0).all())
        torch.testing.assert_close(out[keep], want)
    else:
        total = want.sum()
        expected = {"sum": total, "batchmean": total / keep.sum(), "mean": total / (keep.sum() * 10)}[reduction]
        torch.testing.assert_close(out, expected)
    (g,) = torch.autograd.grad(out.sum(), s)
    assert bool((g[~keep] == 0).all()) and bool(torch.isfinite(g).all())
    w = keep.double()
    torch.testing.assert_close(kd_kl_div(s, t, 2.0, reduction, row_weight=w), out)
    torch.testing.assert_close(kd_kl_div(s, t, 2.0, reduction, row_weight=keep), out)


def test_fractional_row_weights():
    s, t = sample_inputs((5, 8), requires_grad=True, seed=11)
    w = torch.tensor([0.5, 2.0, 0.0, 1.0, 0.25], dtype=torch.float64)
    per_row, per_row_grad = ref_with_grad(s, t, 1.5, "none", w)
    torch.testing.assert_close(kd_kl_div(s, t, 1.5, "none", row_weight=w), per_row * w)
    out = kd_kl_div(s, t, 1.5, "batchmean", row_weight=w)
    torch.testing.assert_close(out, (per_row * w).sum() / w.sum())
    (g,) = torch.autograd.grad(out, s)
    torch.testing.assert_close(g, per_row_grad / w.sum())


def test_all_rows_ignored_gives_zero():
    s, t = sample_inputs((3, 4), requires_grad=True, seed=12)
    target = torch.full((3,), -1)
    for reduction in ("batchmean", "mean", "sum"):
        out = kd_kl_div(s, t, 2.0, reduction, target=target, ignore_index=-1)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, s)
        assert bool((g == 0).all())


def test_batchmean_averages_over_all_leading_dims():
    """[B, L, C] logits: "batchmean" divides the summed loss by B * L rows (a per-token mean),
    where F.kl_div's "batchmean" divides by B only."""
    s, t = sample_inputs((3, 5, 7), requires_grad=True, seed=31)
    temperature = 2.0
    log_p_s = F.log_softmax(s.detach() / temperature, -1)
    log_p_t = F.log_softmax(t / temperature, -1)
    total = temperature ** 2 * F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    out = kd_kl_div(s, t, temperature, "batchmean")
    torch.testing.assert_close(out, total / 15)
    torch_batchmean = temperature ** 2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    torch.testing.assert_close(torch_batchmean, total / 3)  # torch's: over the first dim only
    assert not torch.allclose(out, torch_batchmean)
    (g,) = torch.autograd.grad(out, s)
    _, want_grad = ref_with_grad(s, t, temperature, "batchmean")
    torch.testing.assert_close(g, want_grad)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float16, 6e4), (torch.bfloat16, 3e38)])
def test_reduced_loss_beyond_the_dtype_range_is_inf(dtype, big):
    """Each row's loss is finite (~big) but their sum is not representable: "sum" gives inf
    (what torch.sum gives), never an exception; "none" and the means stay finite."""
    s = torch.zeros(2, 3, dtype=dtype)
    t = torch.zeros(2, 3, dtype=dtype)
    s[:, 1], t[:, 1] = -big, big  # the teacher is sure of class 1, the student gives it ~0
    per_row = kd_kl_div(s, t, 1.0, "none")
    assert bool(torch.isfinite(per_row).all()) and per_row.dtype == dtype
    torch.testing.assert_close(per_row.double(), ref_kd_kl_div(s.double(), t.double(), 1.0, "none"), rtol=1e-2, atol=0)
    total = kd_kl_div(s, t, 1.0, "sum")
    assert total.dtype == dtype and total.item() == math.inf
    assert per_row.sum().item() == math.inf  # the same answer as torch's own reduction
    assert bool(torch.isfinite(kd_kl_div(s, t, 1.0, "batchmean")))
    s64, t64 = s.double().requires_grad_(), t.double()
    out64 = kd_kl_div(s64, t64, 1.0, "sum")  # float64 holds the sum
    torch.testing.assert_close(out64, ref_kd_kl_div(s64.detach(), t64, 1.0, "sum"))


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_half_precision_within_twice_pytorch_error(device, dtype, reduction):
    for shape, temperature in (((32, 1000), 2.0), ((7, 3001), 1.0), ((50, 10), 4.0)):
        s, t = sample_inputs(shape, device, dtype, 2.0, requires_grad=True, seed=shape[1])
        out = kd_kl_div(s, t, temperature, reduction)
        assert out.dtype == dtype
        # The fp32 reference of the same (rounded) inputs, and PyTorch's composite in `dtype`.
        want, want_grad = ref_with_grad(s.float(), t.float(), temperature, reduction)
        s_c = s.detach().requires_grad_()
        composite = ref_kd_kl_div(s_c, t, temperature, reduction)
        (g_c,) = torch.autograd.grad(composite.sum(), s_c)
        assert_within_composite_error(out.cpu(), want.cpu(), composite.cpu(), slack=1e-3)
        (g,) = torch.autograd.grad(out.sum(), s)
        assert g.dtype == dtype
        assert_within_composite_error(g.cpu(), want_grad.cpu(), g_c.cpu(), slack=1e-4, elementwise=False)


# ---------------------------------------------------------------- numerically hard inputs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_logits(dtype):
    s, t = sample_inputs((6, 50), dtype=dtype, scale=1e4, requires_grad=True, seed=13)
    for temperature in (0.1, 1.0, 100.0):
        out = kd_kl_div(s, t, temperature, "none")
        want, want_grad = ref_with_grad(s, t, temperature, "none")
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-6)
        (g,) = torch.autograd.grad(out.sum(), s)
        torch.testing.assert_close(g.double(), want_grad, rtol=1e-4, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_masked_classes_minus_inf():
    s, t = sample_inputs((4, 2100), requires_grad=True, seed=14)
    inf = float("inf")
    with torch.no_grad():
        t[0, ::3] = -inf  # teacher gives these classes no mass: 0 * log 0 = 0
        s[1, 5:1500] = -inf  # both masked in the same places
        t[1, 5:1500] = -inf
        t[2, :1100] = -inf  # the whole first block of the teacher is masked
        s[3, 7] = -inf  # student rules out a class the teacher does not
    out = kd_kl_div(s, t, 2.0, "none")
    want, want_grad = ref_with_grad(s, t, 2.0, "none")
    torch.testing.assert_close(out[:3], want[:3], rtol=1e-10, atol=1e-12)
    assert out[3].item() == inf and want[3].item() == inf
    (g,) = torch.autograd.grad(out[:3].sum(), s)
    torch.testing.assert_close(g[:3], want_grad[:3], rtol=1e-9, atol=1e-12)
    assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_identical_rows_give_zero(dtype):
    s, _ = sample_inputs((8, 3000), dtype=dtype, scale=50.0, seed=15)
    s.requires_grad_()
    for temperature in (0.1, 1.0, 100.0):
        out = kd_kl_div(s, s.detach().clone(), temperature, "none")
        assert bool((out == 0).all()), out
        (g,) = torch.autograd.grad(out.sum(), s)
        assert bool((g == 0).all())


def test_never_negative():
    # Nearly equal rows: the true KL is tiny and must not come out negative.
    s, t = sample_inputs((64, 500), dtype=torch.float32, seed=16)
    t = s + 1e-4 * t
    for temperature in (0.1, 1.0, 100.0):
        out = kd_kl_div(s, t, temperature, "none")
        assert bool((out >= 0).all())
        want = ref_kd_kl_div(s.double(), t.double(), temperature, "none")
        assert_within_composite_error(out, want, ref_kd_kl_div(s, t, temperature, "none"))


def test_temperature_range_float64():
    s, t = sample_inputs((3, 40), requires_grad=True, seed=17)
    for temperature in (0.1, 0.3, 7.0, 100.0):
        out = kd_kl_div(s, t, temperature, "sum")
        want, want_grad = ref_with_grad(s, t, temperature, "sum")
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(out, s)
        torch.testing.assert_close(g, want_grad, rtol=1e-9, atol=1e-13)


def test_one_class_and_empty_batch():
    s, t = sample_inputs((5, 1), requires_grad=True, seed=18)
    out = kd_kl_div(s, t, 2.0)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, s)
    assert bool((g == 0).all())
    s, t = sample_inputs((0, 7), requires_grad=True)
    for reduction in REDUCTIONS:
        out = kd_kl_div(s, t, 2.0, reduction)
        assert out.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert out.item() == 0.0
            (g,) = torch.autograd.grad(out, s)
            assert g.shape == (0, 7)


def test_non_contiguous_and_3d_inputs():
    base_s, base_t = sample_inputs((6, 40, 3), dtype=torch.float32, seed=19)
    s = base_s.transpose(1, 2).requires_grad_()  # [6, 3, 40], class dim strided
    t = base_t[:, ::2, :].transpose(1, 2)  # [6, 3, 20]... sliced below to match
    t = base_t.transpose(1, 2)
    assert not s.is_contiguous()
    out = kd_kl_div(s, t, 2.0, "none")
    want, want_grad = ref_with_grad(s, t, 2.0, "none")
    assert out.shape == (6, 3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), s)
    torch.testing.assert_close(g.double(), want_grad, rtol=1e-4, atol=1e-6)
    # Rows with a stride (every other row of a bigger tensor) and an expanded teacher row.
    big_s, _ = sample_inputs((10, 33), dtype=torch.float32, seed=20)
    rows_s = big_s[::2]
    one_t = sample_inputs((1, 33), dtype=torch.float32, seed=21)[1].expand(5, 33)
    torch.testing.assert_close(kd_kl_div(rows_s, one_t, 1.0, "none").double(),
                               ref_kd_kl_div(rows_s.double(), one_t.double(), 1.0, "none"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- SIMD paths


@pytest.mark.slow
def test_every_simd_path_agrees():
    script = textwrap.dedent(
        """
        import torch, torchslim
        from torchslim.ops import kd_kl_div
        from torchslim.ops._reference import ref_kd_kl_div
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for C in (1, 7, 16, 33, 2500):
                s = (torch.randn(9, C, generator=g) * 3).to(dtype).requires_grad_()
                t = (torch.randn(9, C, generator=g) * 3).to(dtype)
                if C > 3:
                    t[0, 1] = float("-inf")
                out = kd_kl_div(s, t, 1.7, "none")
                (gs,) = torch.autograd.grad(out.sum(), s)
                s64 = s.detach().double().requires_grad_()
                want = ref_kd_kl_div(s64, t.double(), 1.7, "none")
                (gw,) = torch.autograd.grad(want.sum(), s64)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(out.double(), want.detach(), rtol=tol, atol=tol)
                torch.testing.assert_close(gs.double(), gw, rtol=tol, atol=tol)
        print(torchslim.build_info()["simd"])
        """
    )
    env_base = dict(os.environ)
    env_base["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(torchslim.__file__)),
                                                         env_base.get("PYTHONPATH", "")] if p)
    # This process runs the best level the CPU has; the lower ones run in subprocesses
    # (the level is read once per process), side by side.
    procs = [subprocess.Popen([sys.executable, "-c", script], env=dict(env_base, TORCHSLIM_SIMD=level),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for level in ("scalar", "avx2")]
    seen = set()
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        seen.add(out.strip().splitlines()[-1])
    assert "scalar" in seen


# ---------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors():
    s, t = sample_inputs((3, 5), dtype=torch.float32, seed=22)
    with pytest.raises(ValueError, match="teacher_logits must have the shape"):
        kd_kl_div(s, t[:, :4])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kd_kl_div(s, t, bad)
    with pytest.raises(TypeError, match="temperature"):
        kd_kl_div(s, t, "2")
    with pytest.raises(ValueError, match="reduction"):
        kd_kl_div(s, t, 1.0, "average")
    with pytest.raises(TypeError, match="student_logits"):
        kd_kl_div(s.long(), t.long())
    with pytest.raises(TypeError, match="teacher_logits must have the dtype"):
        kd_kl_div(s, t.double())
    with pytest.raises(ValueError, match="detach"):
        kd_kl_div(s, t.requires_grad_())
    t = t.detach()
    with pytest.raises(ValueError, match="row_weight"):
        kd_kl_div(s, t, row_weight=torch.ones(4))
    with pytest.raises(TypeError, match="target"):
        kd_kl_div(s, t, target=torch.zeros(3))
    with pytest.raises(ValueError, match="student_logits"):
        kd_kl_div(torch.tensor(1.0), torch.tensor(1.0))
    # The C++ op checks its arguments too (TORCH_CHECK naming the argument).
    op = torch.ops.torchslim.kd_kl_div_fwd
    with pytest.raises(RuntimeError, match="temperature"):
        op(s, t, -2.0, 3, None, False)
    with pytest.raises(RuntimeError, match="reduction"):
        op(s, t, 2.0, 7, None, False)
    with pytest.raises(RuntimeError, match="teacher_logits"):
        op(s, t.double(), 2.0, 3, None, False)
    with pytest.raises(RuntimeError, match="row_weight"):
        op(s, t, 2.0, 3, torch.ones(2), False)


def test_teacher_requiring_grad_is_fine_without_grad_mode():
    s, t = sample_inputs((3, 5), seed=23)
    t.requires_grad_()
    with torch.no_grad():
        out = kd_kl_div(s, t, 2.0)
    torch.testing.assert_close(out, ref_kd_kl_div(s, t.detach(), 2.0))


# ---------------------------------------------------------------- KDLoss


def test_kdloss_mixes_kd_and_cross_entropy():
    s, t = sample_inputs((4, 5, 10), requires_grad=True, seed=24)
    target = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(2))
    t.requires_grad_()  # the module detaches the teacher itself
    loss = KDLoss(temperature=3.0, alpha=0.7)(s, t, target)
    kd = ref_kd_kl_div(s, t.detach(), 3.0, "batchmean")
    ce = F.cross_entropy(s.reshape(-1, 10), target.reshape(-1))
    torch.testing.assert_close(loss, 0.7 * kd + 0.3 * ce)
    loss.backward()
    assert t.grad is None and s.grad is not None
    s.grad = None
    only_kd = KDLoss(temperature=3.0, alpha=0.7)(s, t)
    torch.testing.assert_close(only_kd, kd)
    torch.testing.assert_close(KDLoss(3.0, alpha=0.0)(s, t, target), ce)
    torch.testing.assert_close(KDLoss(3.0, alpha=1.0)(s, t, target), kd)


def test_kdloss_ignores_padding_rows():
    s, t = sample_inputs((6, 9), requires_grad=True, seed=25)
    target = torch.tensor([1, -100, 3, 4, -100, 0])
    keep = target != -100
    loss = KDLoss(2.0, 0.5)(s, t, target)
    want = 0.5 * ref_kd_kl_div(s[keep], t[keep], 2.0) + 0.5 * F.cross_entropy(s[keep], target[keep])
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_kdloss_every_target_ignored_is_zero(alpha, shape):
    """Both terms are means over the rows that count; over zero rows they are 0 (not 0/0),
    with a zero gradient: a batch made only of padding contributes nothing."""
    s, t = sample_inputs(shape, requires_grad=True, seed=26)
    target = torch.full(shape[:-1], -100)
    assert math.isnan(F.cross_entropy(s.reshape(-1, 6), target.reshape(-1)).item())  # what we avoid
    loss = KDLoss(2.0, alpha)(s, t, target)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, s)
    assert bool((g == 0).all())
    # one valid target: the terms are that row's losses again (the zero case is not a clamp)
    target.view(-1)[1] = 2
    loss = KDLoss(2.0, alpha)(s, t, target)
    row = s.reshape(-1, 6)[1:2]
    want = alpha * ref_kd_kl_div(row, t.reshape(-1, 6)[1:2], 2.0) + (1 - alpha) * F.cross_entropy(row, target.view(-1)[1:2])
    torch.testing.assert_close(loss, want)
    assert loss.item() > 0


def test_kdloss_validates_arguments():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            KDLoss(alpha=bad)
    for bad in (0.0, -3.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            KDLoss(temperature=bad)
    assert "temperature=4.0" in repr(KDLoss())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 10), (16, 1000), (4, 32000), (3, 5, 4097)])
def test_cuda_matches_cpu(dtype, shape):
    s, t = sample_inputs(shape, "cpu", dtype, 3.0, seed=26)
    w = (torch.arange(math.prod(shape[:-1])) % 3 != 0).reshape(shape[:-1])
    for reduction in REDUCTIONS:
        sc = s.cuda().requires_grad_()
        out = kd_kl_div(sc, t.cuda(), 2.0, reduction, row_weight=w.cuda())
        (g,) = torch.autograd.grad(out.sum(), sc)
        sr = s.clone().requires_grad_()
        want = kd_kl_div(sr, t, 2.0, reduction, row_weight=w)
        (gw,) = torch.autograd.grad(want.sum(), sr)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.cpu().double(), want.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(g.cpu().double(), gw.double(), rtol=tol, atol=tol)
