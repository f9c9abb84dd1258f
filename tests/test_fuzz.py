"""Property tests: random shapes, dtypes, strides and deliberately wrong arguments for every
op. Each case must either match the float64 reference or raise a Python exception — never
crash, hang or return garbage. TORCHSLIM_FUZZ_EXAMPLES sets examples per test (default 150)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim.ops import codebook_linear, kd_kl_div, masked_linear
from torchslim.ops._reference import pack_int4, ref_codebook_linear, ref_kd_kl_div, ref_masked_linear

EXAMPLES = int(os.environ.get("TORCHSLIM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# What "a clear error" may be: Python's argument errors, or a TORCH_CHECK (RuntimeError).
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)

dims = st.integers(min_value=0, max_value=37)
pos_dims = st.integers(min_value=1, max_value=37)
float_dtypes = st.sampled_from([torch.float32, torch.float64])


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


def _maybe_noncontiguous(t: torch.Tensor, flag: bool) -> torch.Tensor:
    """Same values, other strides: a transposed copy transposed back, or a strided slice."""
    if not flag or t.dim() < 2 or t.numel() == 0:
        return t
    return t.t().contiguous().t() if t.dim() == 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _input(gen, lead, in_f, dtype):
    return torch.randn(*lead, in_f, generator=gen, dtype=torch.float64).to(dtype)


@FUZZ
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=3), in_f=pos_dims, out_f=pos_dims,
       sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99, 1.0]), dtype=float_dtypes, bias=st.booleans(),
       noncontig=st.booleans(), seed=st.integers(0, 2**16))
def test_masked_linear_matches_reference(lead, in_f, out_f, sparsity, dtype, bias, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maybe_noncontiguous(_input(gen, lead, in_f, dtype), noncontig)
    w = _maybe_noncontiguous(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64).to(dtype), noncontig)
    mask = torch.rand(out_f, in_f, generator=gen) >= sparsity
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    got = masked_linear(x, w, mask, b)
    want = ref_masked_linear(x.double(), w.double(), mask, None if b is None else b.double())
    torch.testing.assert_close(got.double(), want, **_tol(dtype))


# The fixture (masked_path: forced sparse, then forced dense) stays set for all examples.
FUZZ_PATHS = settings(FUZZ, suppress_health_check=[*FUZZ.suppress_health_check, HealthCheck.function_scoped_fixture])


@FUZZ_PATHS
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=3), in_f=pos_dims, out_f=pos_dims,
       sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99, 1.0]), dtype=float_dtypes, bias=st.booleans(),
       noncontig=st.booleans(), grad=st.booleans(), seed=st.integers(0, 2**16))
def test_masked_module_both_paths_match_reference(masked_path, lead, in_f, out_f, sparsity, dtype, bias, noncontig,
                                                   grad, seed):
    """MaskedSparseLinear on the path the fixture forces, whatever the size (these layers
    are all under 32,768 weights: at batch 1 the density rule alone would run them dense):
    output and, with grad, input/weight/bias gradients against the float64 reference."""
    from torchslim.nn import MaskedSparseLinear

    gen = torch.Generator().manual_seed(seed)
    x = _maybe_noncontiguous(_input(gen, lead, in_f, dtype), noncontig)
    linear = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen, dtype=torch.float64))
    mask = torch.rand(out_f, in_f, generator=gen) >= sparsity
    layer = MaskedSparseLinear.from_dense(linear, mask=mask)
    params = [layer.weight] + ([layer.bias] if bias else [])
    xr = x.detach().double().requires_grad_(grad)
    refs = [p.detach().double().requires_grad_(grad) for p in params]
    want = ref_masked_linear(xr, refs[0], mask, refs[1] if bias else None)
    if not grad:
        with torch.no_grad():
            got = layer(x)
        assert layer.last_path == masked_path
        torch.testing.assert_close(got.double(), want, **_tol(dtype))
        return
    x = x.detach().requires_grad_()
    got = layer(x)
    assert layer.last_path == masked_path
    torch.testing.assert_close(got.double(), want.detach(), **_tol(dtype))
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(got, [x, *params], g.to(dtype))
    want_grads = torch.autograd.grad(want, [xr, *refs], g)
    for have, ref in zip(grads, want_grads):
        torch.testing.assert_close(have.double(), ref, **_tol(dtype))
    assert bool((grads[1][~mask] == 0).all())


@FUZZ
@given(in_f=pos_dims, out_f=pos_dims, batch=dims, k=st.integers(1, 256), packed=st.booleans(),
       dtype=float_dtypes, bias=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 2**16))
def test_codebook_linear_matches_reference(in_f, out_f, batch, k, packed, dtype, bias, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    if packed:
        k = min(k, 16)
    idx = torch.randint(0, k, (out_f, in_f), generator=gen).to(torch.uint8)
    indices = pack_int4(idx) if packed else idx
    codebook = torch.randn(k, generator=gen, dtype=torch.float64).to(dtype)
    x = _maybe_noncontiguous(_input(gen, [batch], in_f, dtype), noncontig)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    got = codebook_linear(x, indices, codebook, b)
    want = ref_codebook_linear(x.double(), idx, codebook.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), want, **_tol(dtype))


@FUZZ
@given(rows=dims, classes=pos_dims, temperature=st.sampled_from([0.1, 0.5, 1.0, 2.0, 4.0, 20.0, 100.0]),
       reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]), scale=st.sampled_from([1.0, 10.0, 1e3]),
       dtype=float_dtypes, noncontig=st.booleans(), seed=st.integers(0, 2**16))
def test_kd_kl_div_matches_reference(rows, classes, temperature, reduction, scale, dtype, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    s = _maybe_noncontiguous((torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype), noncontig)
    t = _maybe_noncontiguous((torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype), noncontig)
    got = kd_kl_div(s, t, temperature, reduction)
    want = ref_kd_kl_div(s.double(), t.double(), temperature, reduction)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    else:
        # T**2 amplifies fp32 rounding (at T=100 the composite itself is off by ~1e-3), so
        # the rule is flash-attention's: the largest error is at most 2x the largest error of
        # PyTorch's own fp32 composite vs float64 (over the whole output: a single row where
        # the composite happens to round well says nothing about its precision).
        composite = ref_kd_kl_div(s, t, temperature, reduction).double()
        err, err_composite = (got.double() - want).abs(), (composite - want).abs()
        # Floor: the loss is T**2 times differences of fp32 log-probabilities, so its rounding
        # unit is T**2 * eps(fp32); below that, which of two fp32 computations wins is luck.
        if want.numel():
            floor = 1e-5 * (1 + want.abs().max()) + temperature ** 2 * torch.finfo(torch.float32).eps
            assert bool((err <= 2 * err_composite.max() + floor).all()), (got, want, composite)
    assert bool((got >= -1e-3).all()), "KL divergence must not be negative beyond rounding"


# --- deliberately wrong arguments: a Python exception, never a crash or a silent answer ---

def _call_or_clear_error(fn, *args):
    try:
        fn(*args)
    except CLEAR_ERRORS:
        return False
    return True


@FUZZ
@given(in_f=pos_dims, out_f=pos_dims, wrong=st.sampled_from(["in_features", "mask_shape", "mask_float", "bias_len",
                                                               "weight_int", "dtype_mix", "weight_1d"]),
       seed=st.integers(0, 2**16))
def test_masked_linear_wrong_arguments_raise(in_f, out_f, wrong, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, in_f, generator=gen)
    w = torch.randn(out_f, in_f, generator=gen)
    mask = torch.rand(out_f, in_f, generator=gen) > 0.5
    b = torch.randn(out_f, generator=gen)
    if wrong == "in_features":
        x = torch.randn(3, in_f + 1, generator=gen)
    elif wrong == "mask_shape":
        mask = torch.ones(out_f + 1, in_f, dtype=torch.bool)
    elif wrong == "mask_float":
        mask = mask.float() + 0.5  # not a boolean mask: values 0.5/1.5 must not be used as weights
    elif wrong == "bias_len":
        b = torch.randn(out_f + 2, generator=gen)
    elif wrong == "weight_int":
        w = torch.randint(0, 3, (out_f, in_f), generator=gen)
    elif wrong == "dtype_mix":
        x = x.double()
    elif wrong == "weight_1d":
        w = w.reshape(-1)
    if wrong == "mask_float":
        # Either rejected, or treated as a boolean mask (nonzero = kept): never as scale factors.
        try:
            got = masked_linear(x, w, mask, b)
        except CLEAR_ERRORS:
            return
        torch.testing.assert_close(got, ref_masked_linear(x, w, mask != 0, b), rtol=1e-4, atol=1e-4)
        return
    with pytest.raises(CLEAR_ERRORS):
        masked_linear(x, w, mask, b)


@FUZZ
@given(in_f=pos_dims, out_f=pos_dims, k=st.integers(1, 200),
       wrong=st.sampled_from(["index_range", "packed_k", "indices_float", "empty_codebook", "codebook_2d",
                              "in_features", "bias_len", "codebook_int"]),
       seed=st.integers(0, 2**16))
def test_codebook_linear_wrong_arguments_raise(in_f, out_f, k, wrong, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (out_f, in_f), generator=gen).to(torch.uint8)
    codebook = torch.randn(k, generator=gen)
    x = torch.randn(2, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen)
    indices = idx
    if wrong == "index_range":
        indices = idx.clone()
        indices[torch.randint(0, out_f, (1,), generator=gen), torch.randint(0, in_f, (1,), generator=gen)] = min(k, 255)
        if k > 255:
            return
    elif wrong == "packed_k":
        if in_f == 1:
            return  # packed and unpacked layouts are the same bytes for one column
        codebook = torch.randn(max(k, 17), generator=gen)
        indices = pack_int4(idx & 0x0F)
    elif wrong == "indices_float":
        indices = idx.float()
    elif wrong == "empty_codebook":
        codebook = torch.randn(0)
    elif wrong == "codebook_2d":
        codebook = codebook.reshape(1, -1)
    elif wrong == "in_features":
        width = in_f + 3
        if (width + 1) // 2 == in_f:
            width += 2  # else the [out, in_f] bytes are a valid packed layout for `width` columns
        x = torch.randn(2, width, generator=gen)
    elif wrong == "bias_len":
        b = torch.randn(out_f + 1, generator=gen)
    elif wrong == "codebook_int":
        codebook = torch.randint(0, 5, (k,), generator=gen)
    with pytest.raises(CLEAR_ERRORS):
        codebook_linear(x, indices, codebook, b)


@FUZZ
@given(rows=pos_dims, classes=pos_dims,
       wrong=st.sampled_from(["shape", "temperature_zero", "temperature_negative", "reduction", "int_logits", "dtype_mix"]),
       seed=st.integers(0, 2**16))
def test_kd_kl_div_wrong_arguments_raise(rows, classes, wrong, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, classes, generator=gen)
    t = torch.randn(rows, classes, generator=gen)
    temperature, reduction = 2.0, "batchmean"
    if wrong == "shape":
        t = torch.randn(rows, classes + 1, generator=gen)
    elif wrong == "temperature_zero":
        temperature = 0.0
    elif wrong == "temperature_negative":
        temperature = -1.0
    elif wrong == "reduction":
        reduction = "average"
    elif wrong == "int_logits":
        s = torch.randint(0, 4, (rows, classes), generator=gen)
    elif wrong == "dtype_mix":
        t = t.double()
    with pytest.raises(CLEAR_ERRORS):
        kd_kl_div(s, t, temperature, reduction)
