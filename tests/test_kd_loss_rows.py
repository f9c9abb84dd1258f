"""kd_kl_div at few classes per row: the row-group kernel body (C <= 64, W rows per vector step).

The CPU kernel picks its body from the class count alone: C <= 64 runs the row-group body
(rows transposed so that each SIMD lane holds a row), C > 64 the per-row body. Every test
here covers both sides of that boundary (63, 64 | 65, 100) against a float64 PyTorch
reference, and the SIMD bodies (AVX-512 / AVX2 / scalar) are each run through the
TORCHSLIM_SIMD override in subprocesses (the level is read once per process).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchslim
from torchslim.ops import kd_kl_div
from torchslim.ops._reference import ref_kd_kl_div

CLASSES = (1, 3, 10, 17, 63, 64, 65, 100)  # 64 is the last row-group count, 65 the first per-row one
ROWS = (1, 15, 17, 4097)  # partial groups of 16 (AVX-512) and 8 (AVX2) lanes
REDUCTIONS = ("none", "sum", "mean", "batchmean")
# float32: float sums of <= 64 terms; 16-bit: the gradient is rounded to the input dtype.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
       torch.float16: dict(rtol=4e-3, atol=4e-4)}


def _inputs(rows, classes, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


def _reference(s, t, temperature, reduction):
    """Loss and student gradient in float64 from the same (rounded) inputs."""
    s64 = s.detach().double().requires_grad_()
    loss = ref_kd_kl_div(s64, t.double(), temperature, reduction)
    (grad,) = torch.autograd.grad(loss.sum(), s64)
    return loss.detach(), grad


def _ours(s, t, temperature, reduction, **kw):
    s = s.detach().requires_grad_()
    loss = kd_kl_div(s, t, temperature, reduction, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def _check_against_reference(dtypes=(torch.float32, torch.bfloat16, torch.float16), rows=ROWS, classes=CLASSES):
    """Loss and gradient of every (rows, C, dtype, reduction) against the float64 reference."""
    seed = 0
    for dtype in dtypes:
        for n in rows:
            for c in classes:
                seed += 1
                s, t = _inputs(n, c, dtype, seed)
                for reduction, temperature in zip(REDUCTIONS, (1.0, 4.0, 2.5, 0.7)):
                    loss, grad = _ours(s, t, temperature, reduction)
                    want_loss, want_grad = _reference(s, t, temperature, reduction)
                    assert grad.dtype == dtype and grad.shape == s.shape
                    msg = f"{dtype} rows={n} C={c} {reduction} T={temperature}"
                    torch.testing.assert_close(loss.double(), want_loss, **TOL[dtype], msg=msg)
                    torch.testing.assert_close(grad.double(), want_grad, **TOL[dtype], msg=msg)


def test_matches_float64_reference_every_shape_dtype_and_reduction():
    _check_against_reference()


def test_losses_are_not_trivial():
    # The inputs give clearly non-zero losses and gradients (a test that can fail).
    s, t = _inputs(17, 10, torch.float32, 3)
    loss, grad = _ours(s, t, 1.0, "none")
    assert (loss > 0.1).all()
    assert grad.abs().max() > 1e-2


@pytest.mark.parametrize("c", (10, 64, 65))
def test_non_contiguous_and_3d_inputs(c):
    g = torch.Generator().manual_seed(c)
    wide_s = torch.randn(37, c + 5, generator=g) * 2
    wide_t = torch.randn(37, c + 5, generator=g) * 2
    s, t = wide_s[:, 2:2 + c], wide_t[:, 1:1 + c]  # rows strided by c + 5, classes contiguous
    assert s.stride() == (c + 5, 1)
    for reduction in REDUCTIONS:
        loss, grad = _ours(s, t, 2.0, reduction)
        want_loss, want_grad = _reference(s, t, 2.0, reduction)
        torch.testing.assert_close(loss.double(), want_loss, **TOL[torch.float32])
        torch.testing.assert_close(grad.double(), want_grad, **TOL[torch.float32])
    # Leading dims [3, 7, C] and a transposed (class dim strided) input, copied by the op.
    s3, t3 = (torch.randn(7, 3, c, generator=g).transpose(0, 1) for _ in range(2))
    loss, grad = _ours(s3, t3, 1.5, "none")
    want_loss, want_grad = _reference(s3, t3, 1.5, "none")
    assert loss.shape == (3, 7)
    torch.testing.assert_close(loss.double(), want_loss, **TOL[torch.float32])
    torch.testing.assert_close(grad.double(), want_grad, **TOL[torch.float32])
    sc, tc = torch.randn(c, 21, generator=g).t(), torch.randn(c, 21, generator=g).t()
    loss, grad = _ours(sc, tc, 1.0, "batchmean")
    want_loss, want_grad = _reference(sc, tc, 1.0, "batchmean")
    torch.testing.assert_close(loss.double(), want_loss, **TOL[torch.float32])
    torch.testing.assert_close(grad.double(), want_grad, **TOL[torch.float32])


@pytest.mark.parametrize("c", (10, 64))
def test_empty_batch(c):
    s = torch.randn(0, c, requires_grad=True)
    t = torch.randn(0, c)
    assert kd_kl_div(s, t, 2.0, "none").shape == (0,)
    loss = kd_kl_div(s, t, 2.0, "sum")
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and grad.shape == (0, c)


@pytest.mark.parametrize("c", (3, 10, 64, 65))
def test_padding_rows_count_for_nothing(c):
    # Rows of weight 0 (here filled with NaN and inf) give loss 0 and an exactly zero gradient;
    # the weighted rows match the reference; batchmean divides by the weight sum.
    s, t = _inputs(21, c, torch.float32, 40 + c)
    w = torch.ones(21)
    w[[0, 5, 16, 20]] = 0.0
    w[7] = 2.5
    s[5] = float("nan")
    t[16] = float("inf")
    s[20, 0] = float("-inf")
    for reduction in ("none", "batchmean", "sum"):
        loss, grad = _ours(s, t, 2.0, reduction, row_weight=w)
        keep = w > 0
        assert (grad[~keep] == 0).all()
        want_rows, want_grad = _reference(s[keep], t[keep], 2.0, "none")
        wk = w[keep].double()
        if reduction == "none":
            assert (loss[~keep] == 0).all()
            torch.testing.assert_close(loss[keep].double(), want_rows * wk, **TOL[torch.float32])
            torch.testing.assert_close(grad[keep].double(), want_grad * wk[:, None], **TOL[torch.float32])
        else:
            div = wk.sum() if reduction == "batchmean" else 1.0
            torch.testing.assert_close(loss.double(), (want_rows * wk).sum() / div, **TOL[torch.float32])
            torch.testing.assert_close(grad[keep].double(), want_grad * wk[:, None] / div, **TOL[torch.float32])


@pytest.mark.parametrize("c", (1, 10, 63, 64, 65))
def test_identical_rows_give_exact_zeros(c):
    s, _ = _inputs(19, c, torch.float32, 60 + c)
    loss, grad = _ours(s, s.clone(), 3.0, "none")
    assert (loss == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("c", (10, 64, 65))
def test_extreme_logits(dtype, c):
    # Large magnitudes (no overflow in the exponentials), -inf teacher classes (0 * log 0 = 0)
    # and a student row with -inf entries where the teacher has mass (an infinite loss).
    s, t = _inputs(18, c, dtype, 80 + c, scale=300.0)
    t[1, 0] = float("-inf")
    if c > 2:
        t[2, : c // 2] = float("-inf")
    loss, grad = _ours(s, t, 1.0, "none")
    want_loss, want_grad = _reference(s, t, 1.0, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 300)
    torch.testing.assert_close(grad.double(), want_grad, **TOL[dtype])


@pytest.mark.parametrize("c", (10, 64, 65))
@pytest.mark.parametrize("temperature", (20.0, 100.0))
def test_high_temperature(c, temperature):
    # Softened distributions close to each other: the loss is a small difference of two
    # terms (float32 exponentials bound its accuracy to ~1e-3 relative at T = 100).
    g = torch.Generator().manual_seed(c + int(temperature))
    t = torch.randn(64, c, generator=g) * 3
    s = t + torch.randn(64, c, generator=g)
    loss, grad = _ours(s, t, temperature, "none")
    want_loss, want_grad = _reference(s, t, temperature, "none")
    assert (want_loss > 1e-2).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-3, atol=0.0)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-5)


def test_gradcheck_and_opcheck_at_few_classes():
    # float64 runs the double body; this checks the op's autograd at the shapes of this file.
    g = torch.Generator().manual_seed(5)
    for n, c in ((1, 1), (17, 3), (5, 10), (4, 65)):
        s = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randn(n, c, generator=g, dtype=torch.float64)
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(lambda x: kd_kl_div(x, t, 1.7, reduction), (s,))
    s32, t32 = _inputs(17, 10, torch.float32, 6)
    torch.library.opcheck(torch.ops.torchslim.kd_kl_div_fwd, (s32.requires_grad_(), t32, 2.0, 3, None, True))
    torch.library.opcheck(torch.ops.torchslim.kd_kl_div_fwd, (s32, t32, 2.0, 0, torch.ones(17), True))


def test_deterministic_across_thread_counts():
    s, t = _inputs(4097, 10, torch.float32, 7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ours(s, t, 2.0, "batchmean")
        torch.set_num_threads(2)
        two = _ours(s, t, 2.0, "batchmean")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def _simd_levels_here():
    """The SIMD levels this CPU can run (the kernel's own detection, read from /proc/cpuinfo)."""
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    levels = ["scalar"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            levels.append("avx512")
    return levels


@pytest.mark.parametrize("level", ("scalar", "avx2", "avx512"))
def test_each_simd_body_matches_reference(level):
    if level not in _simd_levels_here():
        pytest.skip(f"this CPU has no {level}")
    script = textwrap.dedent(
        f"""
        import sys, torch, torchslim
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import test_kd_loss_rows as m
        got = torchslim.build_info()["simd"]
        assert got == {level!r}, f"asked for {level}, the kernel runs {{got}}"
        torch.set_num_threads(1)
        m._check_against_reference(rows=(1, 15, 17, 33), classes=(1, 3, 10, 17, 63, 64, 65))
        m.test_identical_rows_give_exact_zeros(10)
        m.test_padding_rows_count_for_nothing(10)
        print("ok", got)
        """
    )
    env = dict(os.environ, TORCHSLIM_SIMD=level)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [os.path.dirname(os.path.dirname(torchslim.__file__)), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"ok {level}"
