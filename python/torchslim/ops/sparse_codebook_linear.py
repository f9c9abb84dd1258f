"""sparse_codebook_linear: a pruned + weight-shared linear layer run from its compressed form.

``sparse_codebook_linear(input, row_ptr, col_idx, codes, codebook, bias=None)`` computes
``input @ W.T + bias`` with any leading batch dimensions, where the weight ``W [out, in]``
is held as CSR by rows with a codebook index per kept weight (the EIE layout):

* ``row_ptr``: int32 ``[out + 1]``, ``row_ptr[0] == 0``, non-decreasing, ``row_ptr[-1] == nnz``;
* ``col_idx``: int16 (``in <= 32767``) or int32 ``[nnz]``, the absolute column of each kept
  weight (any order within a row);
* ``codes``: the codebook index of each kept weight, in the same (CSR) order, either packed
  4-bit (``ceil(nnz / 2)`` bytes, at most 16 clusters; entry ``k`` in byte ``k // 2``, the low
  nibble when ``k`` is even, the high nibble when odd; rows may start mid-byte) or one
  uint8 per entry (``nnz`` bytes, at most 256 clusters). The layout is recognised by
  ``codes.numel()``;
* ``W[r, col_idx[k]] = codebook[code(k)]`` for ``k`` in ``row_ptr[r] .. row_ptr[r + 1] - 1``,
  zero elsewhere.

Per kept weight the kernel reads 2 B of column and 0.5 B of code (vs 4 B value + 2 B
column for the fp32 sparse path). Absolute int16 columns were chosen over relative uint8
gaps with an escape: the batch-1 AVX-512 kernel feeds the columns straight into a gather,
while gaps would need a 16-lane prefix sum (and the escape a branch) per step, for 1 B
per weight less.

Dtypes: float32; float64 (exact, e.g. for gradcheck); bfloat16 / float16 input (computed in
float32, rounded once). ``codebook`` and ``bias`` have the input's dtype.

Structure checks (row_ptr order and ends, every column < in_features, every code <
num_clusters) run once per structure: a structure that passed is remembered until one of
its tensors is written to or freed. Non-contiguous structure tensors are refused.
Structural zeros are true zeros: a non-finite input feeding only pruned positions does not
reach the output (unlike a dense product, where ``0 * inf = nan``).

Gradients flow to ``input`` (through the transposed structure, built once per structure
and cached), ``codebook`` (``dC[c]`` = sum of ``dW = grad^T @ input`` over the kept
positions with code ``c``, Deep Compression eq. 3, formed per kept weight without a dense
``dW``, summed in a fixed order: deterministic across thread counts) and ``bias``.

``sparse_codebook_pack(labels, keep_mask=None, num_clusters=16)`` builds
``(row_ptr, col_idx, codes)`` from a dense ``[out, in]`` label matrix.
"""
from __future__ import annotations

import torch

import torchslim._extension  # noqa: F401  (loads torch.ops.torchslim)

__all__ = ["sparse_codebook_linear", "sparse_codebook_pack", "sparse_codebook_unpack", "cpu_path"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OP = "sparse_codebook_linear"


def _check_meta(input_dtype, row_ptr, col_idx, codes, codebook):
    """Shape / dtype checks the fake kernels share with the C++ glue; returns out_features."""
    torch._check(row_ptr.dtype == torch.int32, lambda: f"{_OP}: row_ptr must be int32, got {row_ptr.dtype}")
    torch._check(row_ptr.dim() == 1 and row_ptr.shape[0] >= 1,
                 lambda: f"{_OP}: row_ptr must be 1-D [out_features + 1], got shape {tuple(row_ptr.shape)}")
    torch._check(col_idx.dtype in (torch.int16, torch.int32),
                 lambda: f"{_OP}: col_idx must be int16 or int32, got {col_idx.dtype}")
    torch._check(col_idx.dim() == 1, lambda: f"{_OP}: col_idx must be 1-D [nnz], got shape {tuple(col_idx.shape)}")
    torch._check(codes.dtype == torch.uint8, lambda: f"{_OP}: codes must be uint8, got {codes.dtype}")
    torch._check(codes.dim() == 1, lambda: f"{_OP}: codes must be 1-D, got shape {tuple(codes.shape)}")
    torch._check(codebook.dim() == 1, lambda: f"{_OP}: codebook must be 1-D, got shape {tuple(codebook.shape)}")
    torch._check(codebook.dtype == input_dtype,
                 lambda: f"{_OP}: codebook dtype {codebook.dtype} differs from input dtype {input_dtype}")
    return row_ptr.shape[0] - 1


@torch.library.register_fake("torchslim::sparse_codebook_linear")
def _(input, row_ptr, col_idx, codes, codebook, bias=None):
    out_features = _check_meta(input.dtype, row_ptr, col_idx, codes, codebook)
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features,
                     lambda: f"{_OP}: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("torchslim::sparse_codebook_linear_grad_input")
def _(grad_output, row_ptr, col_idx, codes, codebook, in_features):
    _check_meta(grad_output.dtype, row_ptr, col_idx, codes, codebook)
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


@torch.library.register_fake("torchslim::sparse_codebook_linear_grad_codebook")
def _(grad_output, input, row_ptr, col_idx, codes, codebook):
    _check_meta(input.dtype, row_ptr, col_idx, codes, codebook)
    return codebook.new_empty(codebook.shape)


@torch.library.register_fake("torchslim::_sparse_codebook_transpose")
def _(row_ptr, col_idx, codes, in_features):
    nnz = col_idx.shape[0]
    out_features = row_ptr.shape[0] - 1
    idx_dtype = torch.int16 if out_features <= 32767 else torch.int32
    return (row_ptr.new_empty((in_features + 1,)), col_idx.new_empty((nnz,), dtype=idx_dtype),
            codes.new_empty((nnz,)))


# Autograd (input, codebook and bias gradients; double backward through grad_input) is
# registered in C++ (csrc/ops/sparse_codebook_linear.cpp): a Python autograd kernel would
# cost ~5 us per call, as much as a small layer's whole kernel at batch 1.


def _require_tensor(name, t, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{_OP}: {name} must be {kind}, got {type(t).__name__}")


_op = torch.ops.torchslim.sparse_codebook_linear.default


def _explain(input, row_ptr, col_idx, codes, codebook, bias):
    """Raise the Python error (TypeError / ValueError) for a wrong argument, if there is one."""
    for name, t in (("input", input), ("row_ptr", row_ptr), ("col_idx", col_idx), ("codes", codes),
                    ("codebook", codebook)):
        _require_tensor(name, t)
    _require_tensor("bias", bias, optional=True)
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: input must be floating point (float32, float64, bfloat16, float16), got {input.dtype}")
    if codebook.dtype != input.dtype:
        raise TypeError(f"{_OP}: codebook dtype {codebook.dtype} differs from input dtype {input.dtype}")
    if row_ptr.dtype != torch.int32:
        raise TypeError(f"{_OP}: row_ptr must be int32 (torch.int32), got {row_ptr.dtype}")
    if col_idx.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{_OP}: col_idx must be int16 or int32, got {col_idx.dtype}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"{_OP}: codes must be uint8 (torch.uint8), got {codes.dtype}")
    if input.dim() < 1:
        raise ValueError(f"{_OP}: input must have at least 1 dimension [..., in_features], got a 0-D tensor")


def sparse_codebook_linear(input: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, codes: torch.Tensor,
                           codebook: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ W.T + bias`` with ``W`` the CSR + codebook layout described in the module docstring.

    Args:
        input: ``[..., in_features]`` float32 / float64 / bfloat16 / float16.
        row_ptr: int32 ``[out_features + 1]``.
        col_idx: int16 or int32 ``[nnz]`` absolute columns.
        codes: uint8, packed 4-bit ``[ceil(nnz / 2)]`` (<= 16 clusters) or ``[nnz]`` (<= 256).
        codebook: ``[num_clusters]`` of the input's dtype.
        bias: optional ``[out_features]`` of the input's dtype.

    Returns ``[..., out_features]`` in the input's dtype. Wrong argument types or dtypes raise
    TypeError, a malformed structure RuntimeError (checked in C++ before any kernel runs).
    """
    # The argument checks run only when the op refuses its arguments: a layer called per
    # token pays nothing for them.
    try:
        return _op(input, row_ptr, col_idx, codes, codebook, bias)
    except (RuntimeError, TypeError):
        _explain(input, row_ptr, col_idx, codes, codebook, bias)
        raise


def sparse_codebook_pack(labels: torch.Tensor, keep_mask: torch.Tensor | None = None, num_clusters: int = 16,
                         packed: bool | None = None):
    """``(row_ptr, col_idx, codes)`` of ``sparse_codebook_linear`` from a dense label matrix.

    Args:
        labels: integer ``[out, in]`` codebook index of every position (values of pruned
            positions are ignored).
        keep_mask: bool ``[out, in]``, the kept positions; ``None``: ``labels != 0`` (the
            convention where code 0 is the pinned zero of a pruned + shared layer).
        num_clusters: codebook size K (1..256); every kept label must be below it.
        packed: 4-bit codes (default when ``num_clusters <= 16``) or one byte per code.

    ``col_idx`` is int16 when ``in <= 32767``, else int32. Runs on the labels' device.
    """
    _require_tensor("labels", labels)
    if labels.dim() != 2:
        raise ValueError(f"sparse_codebook_pack: labels must be 2-D [out_features, in_features], "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"sparse_codebook_pack: labels must be an integer tensor, got {labels.dtype}")
    if not isinstance(num_clusters, int) or not 1 <= num_clusters <= 256:
        raise ValueError(f"sparse_codebook_pack: num_clusters must be an int in [1, 256], got {num_clusters!r}")
    if packed is None:
        packed = num_clusters <= 16
    if packed and num_clusters > 16:
        raise ValueError(f"sparse_codebook_pack: packed 4-bit codes hold at most 16 clusters, got {num_clusters}")
    if keep_mask is None:
        keep_mask = labels != 0
    else:
        _require_tensor("keep_mask", keep_mask)
        if keep_mask.dtype != torch.bool:
            raise TypeError(f"sparse_codebook_pack: keep_mask must be bool, got {keep_mask.dtype}")
        if keep_mask.shape != labels.shape:
            raise ValueError(f"sparse_codebook_pack: keep_mask shape {tuple(keep_mask.shape)} differs from "
                             f"labels shape {tuple(labels.shape)}")
        keep_mask = keep_mask.to(labels.device)
    out_f, in_f = labels.shape
    kept = labels[keep_mask]  # row-major order = CSR order
    if kept.numel() > 0:
        lo, hi = int(kept.min()), int(kept.max())
        if lo < 0 or hi >= num_clusters:
            raise ValueError(f"sparse_codebook_pack: kept labels must be in [0, {num_clusters}), got [{lo}, {hi}]")
    if kept.numel() > 2**31 - 1:
        raise ValueError(f"sparse_codebook_pack: at most 2^31 - 1 kept weights, got {kept.numel()}")
    counts = keep_mask.sum(1, dtype=torch.int64)
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int64, device=labels.device)
    row_ptr[1:] = counts.cumsum(0)
    col = keep_mask.nonzero()[:, 1]
    col_idx = col.to(torch.int16 if in_f <= 32767 else torch.int32)
    codes = kept.to(torch.uint8)
    if packed:
        if codes.numel() % 2:
            codes = torch.cat((codes, codes.new_zeros(1)))
        codes = codes[0::2] | (codes[1::2] << 4)
    return row_ptr.to(torch.int32), col_idx.contiguous(), codes.contiguous()


def sparse_codebook_unpack(row_ptr: torch.Tensor, col_idx: torch.Tensor, codes: torch.Tensor, in_features: int):
    """Inverse of ``sparse_codebook_pack``: ``(labels [out, in] uint8, keep_mask [out, in] bool)``,
    labels 0 at pruned positions."""
    out_f = row_ptr.numel() - 1
    nnz = col_idx.numel()
    if codes.numel() != nnz:  # packed
        codes = torch.stack((codes & 0x0F, codes >> 4), 1).reshape(-1)[:nnz]
    rows = torch.repeat_interleave(torch.arange(out_f, device=row_ptr.device), row_ptr.long().diff(),
                                   output_size=nnz)
    labels = torch.zeros(out_f, in_features, dtype=torch.uint8, device=row_ptr.device)
    mask = torch.zeros(out_f, in_features, dtype=torch.bool, device=row_ptr.device)
    labels[rows, col_idx.long()] = codes
    mask[rows, col_idx.long()] = True
    return labels, mask


_ISAS = ("scalar", "avx2", "avx512")
_LOOKUPS = ("nibble16", "byte16", "byte32", "gather")


def cpu_path(num_clusters: int, packed: bool, batch: int, fp64: bool = False) -> str:
    """Name of the CPU kernel body the op runs for this layout and batch on this machine,
    e.g. ``"avx512-spmv-nibble16"`` (batch-1 kernel per input row) or ``"avx2-spmm-gather"``
    (batched kernel); ``"-fp64"`` is appended for float64 (scalar bodies). For tests and
    benchmarks: it honours the ``TORCHSLIM_SIMD`` cap like the kernels do."""
    code = torch.ops.torchslim._sparse_codebook_linear_path(int(num_clusters), bool(packed), int(batch), bool(fp64))
    name = f"{_ISAS[code // 16]}-{'spmm' if code & 2 else 'spmv'}-{_LOOKUPS[(code // 4) % 4]}"
    return name + "-fp64" if code & 1 else name
