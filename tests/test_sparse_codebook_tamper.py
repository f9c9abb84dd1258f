"""Sparse-codebook structures edited behind PyTorch's version counter (issue 16.2).

The ops check a structure once and remember it; an edit through ``.numpy()`` does not bump
the version, so the next call runs on the edited indices unchecked. The kernels clamp what
they read (row ranges into [0, nnz], columns into [0, in - 1] as unsigned, codes into the
256-entry padded table, codebook-gradient bins into [0, K - 1]): wrong numbers, never an
out-of-bounds access. Run under scripts/sanitize.sh (ASan) to check the "never".
"""
import pytest
import torch
from torch import nn

import torchslim
from torchslim.nn import CodebookLinear, DeployedSequential, DeployedSparseCodebookLinear
from torchslim.ops.sparse_codebook_linear import sparse_codebook_pack

SC = torch.ops.torchslim.sparse_codebook_linear.default
MLP = torch.ops.torchslim._sparse_codebook_mlp.default
IN, OUT = 150, 97


def _layer(k, col_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(OUT, IN, generator=g) < 0.3
    keep[:2] = False  # empty rows
    labels = torch.randint(0, k, (OUT, IN), generator=g).to(torch.uint8)
    row_ptr, col_idx, codes = sparse_codebook_pack(labels, keep, num_clusters=k)
    codebook = torch.randn(k, generator=g, dtype=torch.float64).float()
    bias = torch.randn(OUT, generator=g, dtype=torch.float64).float()
    return row_ptr, col_idx.to(col_dtype), codes, codebook, bias


def _codes_of(codes, nnz, k):
    if codes.numel() == nnz:
        return codes.long()
    c = codes.long()
    return torch.stack([c & 0x0F, c >> 4], 1).reshape(-1)[:nnz]


def _clamped_dense(row_ptr, col_idx, codes, codebook):
    """The weight the clamped kernels compute with: row ranges clamped into [0, nnz],
    columns into [0, IN - 1] as unsigned (negative -> last), codes >= K read 0."""
    nnz = col_idx.numel()
    k = codebook.numel()
    table = torch.zeros(256, dtype=torch.float64)
    table[:k] = codebook.double()
    cd = _codes_of(codes, nnz, k)
    w = torch.zeros(OUT, IN, dtype=torch.float64)
    rp = row_ptr.tolist()
    for r in range(OUT):
        k0 = min(max(rp[r], 0), nnz)
        k1 = min(max(rp[r + 1], k0), nnz)
        for e in range(k0, k1):
            c = int(col_idx[e])
            c = IN - 1 if c < 0 or c >= IN else c
            w[r, c] += table[int(cd[e])]
    return w


def _edit(kind, row_ptr, col_idx, codes):
    """Out-of-range values written through .numpy() (no version bump)."""
    rp, ci, cd = row_ptr.numpy(), col_idx.numpy(), codes.numpy()
    nnz = ci.shape[0]
    mid = len(rp) // 2
    if kind == "col_max":
        ci[::7] = torch.iinfo(col_idx.dtype).max
    elif kind == "col_negative":
        ci[1::5] = -1
        ci[3] = torch.iinfo(col_idx.dtype).min
    elif kind == "row_ptr_past_nnz":
        rp[mid:] = nnz + 100000
        rp[-1] = 2**31 - 1
    elif kind == "row_ptr_decreasing":
        rp[mid] = 0
        rp[mid + 1] = -(2**31)
        rp[3] = nnz  # a row spanning everything, then a decrease
    elif kind == "row_ptr_negative":
        rp[:] = -7
    elif kind == "codes_255":
        cd[::3] = 255
    else:
        raise AssertionError(kind)


KINDS = ["col_max", "col_negative", "row_ptr_past_nnz", "row_ptr_decreasing", "row_ptr_negative", "codes_255"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [16, 40])  # packed 4-bit codes and byte codes
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("batch", [1, 37])  # the batch-1 GEMV and the batched kernel
def test_tampered_structure_forward_and_backward(kind, k, col_dtype, batch):
    row_ptr, col_idx, codes, codebook, bias = _layer(k, col_dtype)
    x = torch.randn(batch, IN, dtype=torch.float64).float()
    SC(x, row_ptr, col_idx, codes, codebook, bias)  # checked and remembered
    versions = [t._version for t in (row_ptr, col_idx, codes)]
    _edit(kind, row_ptr, col_idx, codes)
    assert [t._version for t in (row_ptr, col_idx, codes)] == versions  # the cache cannot see the edit

    # Forward: no error (the structure is "known valid"), the clamped weight's numbers.
    y = SC(x, row_ptr, col_idx, codes, codebook, bias)
    w = _clamped_dense(row_ptr, col_idx, codes, codebook)
    torch.testing.assert_close(y.double(), x.double() @ w.T + bias.double(), rtol=1e-4, atol=1e-4)

    # Backward: grad input (transposed structure, built from the edited indices) and codebook.
    xg = x.clone().requires_grad_(True)
    cb = codebook.clone().requires_grad_(True)
    out = SC(xg, row_ptr, col_idx, codes, cb, bias)
    out.backward(torch.randn_like(out))
    assert xg.grad.shape == x.shape and cb.grad.shape == codebook.shape
    assert torch.isfinite(xg.grad).all() and torch.isfinite(cb.grad).all()
    if kind.startswith("col") or kind == "codes_255":  # row_ptr intact: the transposed build is exact too
        g = torch.randn(batch, OUT, dtype=torch.float64).float()
        gi = torch.ops.torchslim.sparse_codebook_linear_grad_input(g, row_ptr, col_idx, codes, codebook, IN)
        torch.testing.assert_close(gi.double(), g.double() @ w, rtol=1e-4, atol=1e-4)


def test_tampered_3d_input_and_empty_batch():
    row_ptr, col_idx, codes, codebook, bias = _layer(16, torch.int16)
    x = torch.randn(2, 3, IN)
    SC(x, row_ptr, col_idx, codes, codebook, bias)
    _edit("col_max", row_ptr, col_idx, codes)
    _edit("row_ptr_decreasing", row_ptr, col_idx, codes)
    w = _clamped_dense(row_ptr, col_idx, codes, codebook)
    y = SC(x, row_ptr, col_idx, codes, codebook, bias)
    torch.testing.assert_close(y.double(), x.double() @ w.T + bias.double(), rtol=1e-4, atol=1e-4)
    assert SC(x[:0], row_ptr, col_idx, codes, codebook, bias).shape == (0, 3, OUT)


def test_edit_through_the_version_counter_is_still_caught():
    """The cache is not a hole: an ordinary in-place edit is checked again and rejected."""
    row_ptr, col_idx, codes, codebook, bias = _layer(16, torch.int16)
    x = torch.randn(1, IN)
    SC(x, row_ptr, col_idx, codes, codebook, bias)
    col_idx[0] = IN
    with pytest.raises(RuntimeError, match="col_idx entry 0 is 150"):
        SC(x, row_ptr, col_idx, codes, codebook, bias)


# ----------------------------------------------------------------------------- fused chain

def _cb_layer(out_f, in_f, density, k, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.bias.copy_(torch.randn(out_f, generator=g))
    mask = torch.rand(out_f, in_f, generator=g) < density
    return CodebookLinear.from_dense(lin, k, mask=mask, max_iter=10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [16, 40])
@pytest.mark.parametrize("batch", [1, 37])
def test_tampered_fused_chain(kind, k, batch):
    model = nn.Sequential(_cb_layer(100, 300, 0.08, k, 1), nn.ReLU(), _cb_layer(10, 100, 0.12, k, 2)).eval()
    dep = torchslim.deploy(model)
    assert type(dep) is DeployedSequential
    assert isinstance(dep[0], DeployedSparseCodebookLinear) and isinstance(dep[2], DeployedSparseCodebookLinear)
    assert hasattr(dep, "_run0_codes")
    x = torch.randn(batch, 300)
    with torch.inference_mode():
        dep(x)  # checked and remembered
    rp, ci, cd = dep._run0_row_ptr, dep._run0_col_idx, dep._run0_codes
    _edit(kind, rp, ci, cd)
    names = []
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            try:
                y = dep(x)
            except RuntimeError as e:
                # row_ptr is read per call for each layer's start and nnz (checked against the
                # tensors' sizes every call): an edit there is an error, not an access.
                assert kind.startswith("row_ptr"), e
                y = None
        names = [e.name for e in prof.events() if e.name.startswith("torchslim::")]
    assert "torchslim::_sparse_codebook_mlp" in names  # the fused kernel ran on the edited arrays
    if y is not None:
        assert y.shape == (batch, 10)
