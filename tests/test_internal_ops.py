"""Hostile arguments to the internal structure ops (torch.ops.torchslim._masked_* and
_sparse_mlp): each malformed structure gets a clear error before any memory is touched,
non-contiguous values are read correctly, int16 indices are refused where they cannot
index, and edits that bypass the version counter (through .numpy()) never make a kernel
read or write out of bounds. scripts/sanitize.sh runs this file under ASan + UBSan, where an
out-of-bounds access fails the run even when it would not crash.

Also: the validated-structure cache holds every structure in use (100 layers in training
are checked once, not on every call), counted through torch.ops.torchslim_debug.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from torchslim.nn import MaskedSparseLinear
from torchslim.ops._reference import ref_masked_linear

ops = torch.ops.torchslim
debug = torch.ops.torchslim_debug


def _structure(rows=6, cols=9, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0, :3] = True  # entries to edit in every case
    mask[rows - 1, cols - 1] = True
    return mask, ops._masked_structure(mask)


def _ref_perm(row_ptr, col_idx):
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr.diff().long())
    key = col_idx.long() * (row_ptr.numel() - 1) + rows
    return torch.sort(key, stable=True).indices.int()


# --------------------------------------------------------------------------- _masked_structure_perm


def test_structure_perm_valid_matches_reference():
    mask, (row_ptr, col_idx, t_row_ptr, t_col_idx) = _structure(7, 11, 0.35)
    perm = ops._masked_structure_perm(row_ptr, col_idx, t_row_ptr)
    assert torch.equal(perm, _ref_perm(row_ptr, col_idx))
    w = torch.randn(7, 11, dtype=torch.float64)
    values = ops._masked_gather(w, row_ptr, col_idx, False)
    assert torch.equal(values[perm.long()], ops._masked_gather(w, t_row_ptr, t_col_idx, True))


def _perm_cases():
    mask, (row_ptr, col_idx, t_row_ptr, _) = _structure(6, 9, 0.4)
    nnz = col_idx.numel()
    counts = t_row_ptr.diff()
    full = int(torch.nonzero(counts > 0)[0])  # a column with entries
    other = (full + 1) % 9

    def t_with(fn):
        t = t_row_ptr.clone()
        fn(t)
        return t

    def shifted(t):  # one entry moved from column `full` to `other`: endpoints and order stay valid
        c = counts.clone()
        c[full] -= 1
        c[other] += 1
        t[1:] = torch.cumsum(c, 0)

    def swapped(t):
        i = 1 + full
        t[i], t[i + 1] = int(t[i + 1]) + 1, int(t[i])
    yield "t_start", row_ptr, col_idx, t_with(lambda t: t.__setitem__(0, 1)), "t_row_ptr must start at 0"
    yield "t_end", row_ptr, col_idx, t_with(lambda t: t.__setitem__(-1, nnz + 5)), "end at nnz"
    yield "t_decreasing", row_ptr, col_idx, t_with(swapped), "t_row_ptr decreases"
    yield "t_counts", row_ptr, col_idx, t_with(shifted), "column counts"
    rp = row_ptr.clone()
    rp[1], rp[2] = int(rp[2]) + 1, int(rp[1])
    yield "row_decreasing", rp, col_idx, t_row_ptr, "row_ptr decreases"
    for bad in (9, -1, 32767):
        ci = col_idx.clone()
        ci[1] = bad
        yield f"col_{bad}", row_ptr, ci, t_row_ptr, "outside \\[0, 9\\)"
    yield "short_t", row_ptr, col_idx, t_row_ptr[:-1].clone(), "t_row_ptr must start at 0 and end at nnz|column counts|outside"
    yield "t_dtype", row_ptr, col_idx, t_row_ptr.long(), "t_row_ptr must be a contiguous 1-D int32"


@pytest.mark.parametrize("case", [c[0] for c in _perm_cases()])
def test_structure_perm_rejects_inconsistent_structures(case):
    _, rp, ci, trp, msg = next(c for c in _perm_cases() if c[0] == case)
    with pytest.raises(RuntimeError, match=msg):
        ops._masked_structure_perm(rp, ci, trp)


# --------------------------------------------------------------------------- non-contiguous values


def _noncontiguous(values, kind):
    if kind == "expanded":
        return values[:1].expand(values.numel())
    if kind == "stride2":
        wide = torch.empty(2 * values.numel(), dtype=values.dtype)
        wide[::2] = values
        wide[1::2] = 1e6  # what a strided read would pick up
        return wide[::2]
    return values


@pytest.mark.parametrize("kind", ["expanded", "stride2"])
@pytest.mark.parametrize("batch", [1, 5])
def test_noncontiguous_values_read_correctly(kind, batch):
    mask, (row_ptr, col_idx, t_row_ptr, t_col_idx) = _structure(40, 33, 0.3, seed=1)
    w = torch.randn(40, 33, dtype=torch.float64)
    dense_values = ops._masked_gather(w, row_ptr, col_idx, False)
    values = _noncontiguous(dense_values, kind)
    assert not values.is_contiguous()
    # The weight these values stand for, in the structure's positions.
    wv = torch.zeros(40, 33, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(40), row_ptr.diff().long())
    wv[rows, col_idx.long()] = values.contiguous()
    x = torch.randn(batch, 33, dtype=torch.float64)
    b = torch.randn(40, dtype=torch.float64)
    torch.testing.assert_close(ops._masked_spmm(x, values, row_ptr, col_idx, b), ref_masked_linear(x, wv, mask, b))

    perm = ops._masked_structure_perm(row_ptr, col_idx, t_row_ptr)
    values_t = _noncontiguous(values.contiguous()[perm.long()], kind)
    g = torch.randn(batch, 40, dtype=torch.float64)
    gi, gw = ops._masked_backward(g, x, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, True, True)
    torch.testing.assert_close(gi, g @ torch.where(mask, wv, 0.0))
    torch.testing.assert_close(gw, torch.where(mask, g.T @ x, 0.0))


# --------------------------------------------------------------------------- int16 vs extent


def test_int16_col_idx_refused_for_large_extents():
    """int16 indices only where every valid index fits (extent <= 32767): above that a
    negative int16 could pass for an in-range index."""
    K = 40000
    row_ptr = torch.tensor([0, 2, 3], dtype=torch.int32)
    col_idx = torch.tensor([5, -1, 7], dtype=torch.int16)
    w = torch.randn(2, K)
    with pytest.raises(RuntimeError, match="int16.*32767"):
        ops._masked_gather(w, row_ptr, col_idx, False)
    with pytest.raises(RuntimeError, match="int16|cannot index"):
        ops._masked_spmm(torch.randn(3, K), torch.randn(3), row_ptr, col_idx, None)
    with pytest.raises(RuntimeError, match="int16|cannot index"):
        ops._masked_sddmm(torch.randn(3, 2), torch.randn(3, K), row_ptr, col_idx)
    # The transposed structure indexes the rows: 40000 rows, int16 -> refused.
    t_row_ptr = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    t_col_idx = torch.tensor([0, 39999 - 65536, 1], dtype=torch.int16)
    rp = torch.tensor([0] + [0] * K, dtype=torch.int32)
    rp[1], rp[2:] = 2, 3
    ci = torch.tensor([0, 1, 2], dtype=torch.int16)
    with pytest.raises(RuntimeError, match="int16.*32767"):
        ops._masked_backward(torch.randn(1, K), torch.randn(1, 3), torch.randn(3), rp, ci, t_row_ptr, t_col_idx,
                             True, True)
    # int32 at the same extent is accepted, and a negative one is out of range.
    ci32 = torch.tensor([5, -1, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside \\[0, 40000\\)"):
        ops._masked_gather(w, row_ptr, ci32, False)
    ci32[1] = K - 1
    torch.testing.assert_close(ops._masked_gather(w, row_ptr, ci32, False), w[[0, 0, 1], [5, K - 1, 7]])


def test_int16_negative_index_at_the_largest_extent():
    row_ptr = torch.tensor([0, 2], dtype=torch.int32)
    w = torch.randn(1, 32767)
    for bad in (-1, -32768):
        col_idx = torch.tensor([3, bad], dtype=torch.int16)
        with pytest.raises(RuntimeError, match="outside \\[0, 32767\\)"):
            ops._masked_gather(w, row_ptr, col_idx, False)


# --------------------------------------------------------------------------- edits behind the version counter


def _clamped(col_idx, extent):
    """The kernels' documented reading of a tampered index: as unsigned, capped at extent - 1."""
    c = col_idx.long()
    return torch.where((c < 0) | (c >= extent), extent - 1, c)


def _spmm_reference(x, values, row_ptr, col_idx, n, k, bias=None):
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff().long())
    w = torch.zeros(n, k, dtype=torch.float64)
    w.index_put_((rows, _clamped(col_idx, k)), values.double(), accumulate=True)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("batch", [1, 4, 40])
def test_edit_through_numpy_never_reads_out_of_bounds(index_dtype, batch):
    """A validated structure is remembered by its version counter, which an edit through
    .numpy() does not move: the next calls must still stay in bounds (the kernels clamp
    what they read). The far-out values would fault without ASan; under ASan any
    out-of-bounds access fails the run."""
    N, K = 37, 29
    mask, (row_ptr, col_idx, t_row_ptr, t_col_idx) = _structure(N, K, 0.3, seed=3)
    col_idx = col_idx.to(index_dtype)
    t_col_idx = t_col_idx.to(index_dtype)
    w = torch.randn(N, K)
    values = ops._masked_gather(w, row_ptr, col_idx, False)
    perm = ops._masked_structure_perm(row_ptr, col_idx, t_row_ptr)
    values_t = values[perm.long()]
    x, g = torch.randn(batch, K), torch.randn(batch, N)
    ops._masked_spmm(x, values, row_ptr, col_idx, None)
    ops._masked_backward(g, x, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, True, True)
    checks = debug.index_checks()
    version = col_idx._version

    far = torch.iinfo(index_dtype)
    col_idx.numpy()[:3] = [far.max, far.min, -1]
    t_col_idx.numpy()[:2] = [far.max, far.min]
    assert col_idx._version == version  # the edit bypassed the version counter

    y = ops._masked_spmm(x, values, row_ptr, col_idx, None)
    gi, gw = ops._masked_backward(g, x, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, True, True)
    sd = ops._masked_sddmm(g, x, row_ptr, col_idx)
    vals2 = ops._masked_gather(w, row_ptr, col_idx, False)
    assert debug.index_checks() == checks  # remembered: the kernels' clamps were all that stood guard
    torch.testing.assert_close(y.double(), _spmm_reference(x, values, row_ptr, col_idx, N, K), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals2, w[torch.repeat_interleave(torch.arange(N), row_ptr.diff().long()),
                                        _clamped(col_idx, K)])
    assert gi.shape == (batch, K) and gw.shape == (N, K) and sd.shape == (N, K)
    assert torch.isfinite(gi).all() and torch.isfinite(gw).all() and torch.isfinite(sd).all()

    # Row pointers edited the same way: entry ranges are clamped into [0, nnz].
    nnz = col_idx.numel()
    rp = row_ptr.numpy()
    rp[1], rp[2], rp[N // 2] = 2**31 - 1, -(2**31), nnz + 1000
    y = ops._masked_spmm(x, values, row_ptr, col_idx, torch.randn(N))
    gi, gw = ops._masked_backward(g, x, values_t, row_ptr, col_idx, t_row_ptr, t_col_idx, True, True)
    ops._masked_gather(w, row_ptr, col_idx, False)
    assert torch.isfinite(y).all() and torch.isfinite(gi).all() and torch.isfinite(gw).all()


def _mlp_args(index_dtype=torch.int32, dims=(23, 31, 17), density=0.4, seed=4):
    """Arguments of _sparse_mlp for a 2-layer chain (ReLU between), from real structures."""
    g = torch.Generator().manual_seed(seed)
    plan, vals, rps, cis, biases = [], [], [], [], []
    rp_off = nnz_off = bias_off = 0
    for i in range(len(dims) - 1):
        k, n = dims[i], dims[i + 1]
        mask = torch.rand(n, k, generator=g) < density
        row_ptr, col_idx, _, _ = ops._masked_structure(mask)
        w = torch.randn(n, k, generator=g)
        vals.append(ops._masked_gather(w, row_ptr, col_idx, False))
        rps.append(row_ptr)
        cis.append(col_idx.to(index_dtype))
        biases.append(torch.randn(n, generator=g))
        plan.append([k, n, rp_off, nnz_off, bias_off, 1 if i + 2 < len(dims) else 0])
        rp_off += n + 1
        nnz_off += col_idx.numel()
        bias_off += n
    return (torch.tensor(plan, dtype=torch.int64), torch.cat(vals), torch.cat(rps), torch.cat(cis),
            torch.cat(biases), dims[-1])


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("batch", [1, 2, 9])
def test_sparse_mlp_edit_through_numpy_never_reads_out_of_bounds(index_dtype, batch):
    plan, values, row_ptr, col_idx, bias, out_f = _mlp_args(index_dtype)
    x = torch.randn(batch, 23)
    ref = ops._sparse_mlp(x, plan, values, row_ptr, col_idx, bias, out_f)
    checks = debug.index_checks()
    far = torch.iinfo(index_dtype)
    col_idx.numpy()[[0, 5, -1]] = [far.max, far.min, -1]
    row_ptr.numpy()[[1, 3]] = [2**31 - 1, -(2**31)]
    y = ops._sparse_mlp(x, plan, values, row_ptr, col_idx, bias, out_f)
    assert debug.index_checks() == checks  # the cached check was reused: only the clamps protected
    assert y.shape == ref.shape and torch.isfinite(y).all()


# --------------------------------------------------------------------------- _sparse_mlp plan bounds


I64_MAX = 2**63 - 1
I64_MIN = -(2**63)


@pytest.mark.parametrize("col,value", [(1, I64_MAX), (1, I64_MAX - 1), (1, -1), (2, I64_MAX), (2, I64_MIN),
                                       (3, I64_MAX), (3, I64_MIN), (4, I64_MAX), (4, I64_MIN), (4, -2),
                                       (0, I64_MAX), (5, 7)])
@pytest.mark.parametrize("layer", [0, 1])
def test_sparse_mlp_plan_extremes_are_errors(col, value, layer):
    """Offsets and sizes at the ends of int64 are refused with an error (no signed overflow
    in the bounds checks: UBSan in scripts/sanitize.sh)."""
    plan, values, row_ptr, col_idx, bias, out_f = _mlp_args()
    plan[layer, col] = value
    with pytest.raises(RuntimeError, match=f"_sparse_mlp: (layer {layer}|out_features)"):
        ops._sparse_mlp(torch.randn(2, 23), plan, values, row_ptr, col_idx, bias, out_f)


# --------------------------------------------------------------------------- validated-structure cache


def test_validated_cache_holds_every_layer_of_a_large_model():
    """100 sparse layers in training: after the first step no structure is checked again
    (a cache smaller than the working set would re-check every index on every call)."""
    torch.manual_seed(0)
    before = debug.index_checks()  # layers may check their structures as they are built
    layers = nn.Sequential(*[MaskedSparseLinear.from_dense(nn.Linear(48, 48), mask=torch.rand(48, 48) < 0.1)
                             for _ in range(100)])
    x = torch.randn(4, 48, requires_grad=True)

    def step():
        layers.zero_grad()
        out = layers(x)
        out.square().sum().backward()

    step()
    assert all(m.last_path == "sparse" for m in layers)  # the structure ops ran on every layer
    first = debug.index_checks() - before
    assert first >= 200  # counted: both structures of every layer were checked once
    assert debug.validated_entries() >= 200
    after_first = debug.index_checks()
    for _ in range(3):
        step()
    assert debug.index_checks() == after_first


def test_validated_cache_drops_freed_structures():
    """Structures that were freed do not accumulate: the table is swept as it doubles."""
    x = torch.randn(2, 16)
    for i in range(1500):
        mask = torch.rand(8, 16) < 0.5
        row_ptr, col_idx, _, _ = ops._masked_structure(mask)
        ops._masked_spmm(x, torch.randn(col_idx.numel()), row_ptr, col_idx, None)
        del row_ptr, col_idx
    gc.collect()
    assert debug.validated_entries() <= 1024


def test_validated_cache_rechecks_after_an_inplace_edit():
    mask, (row_ptr, col_idx, _, _) = _structure(6, 9, 0.4)
    x = torch.randn(2, 9)
    values = torch.randn(col_idx.numel())
    ops._masked_spmm(x, values, row_ptr, col_idx, None)
    n = debug.index_checks()
    ops._masked_spmm(x, values, row_ptr, col_idx, None)
    assert debug.index_checks() == n
    col_idx[0] = 1  # through the version counter: checked again
    ops._masked_spmm(x, values, row_ptr, col_idx, None)
    assert debug.index_checks() == n + 1
