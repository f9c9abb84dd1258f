"""Plain-PyTorch references for every torchslim op.

Tests compare the kernels against these (in float64) and benchmarks time them as the
dense baseline, so both always measure against the same definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_masked_linear(input, weight, mask, bias=None):
    """input @ (weight * mask).T + bias."""
    return F.linear(input, weight * mask.to(weight.dtype), bias)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, ceil(in/2)] uint8, element j in the low nibble of byte j//2 when j is even and
    the high nibble when odd -> [out, in] uint8."""
    low = packed & 0x0F
    high = packed >> 4
    both = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)
    return both[:, :in_features]


def pack_int4(indices: torch.Tensor) -> torch.Tensor:
    """[out, in] integer indices < 16 -> [out, ceil(in/2)] uint8 (inverse of unpack_int4)."""
    idx = indices.to(torch.uint8)
    if idx.shape[1] % 2:
        idx = F.pad(idx, (0, 1))
    return idx[:, 0::2] | (idx[:, 1::2] << 4)


def ref_codebook_linear(input, indices, codebook, bias=None):
    """input @ codebook[indices].T + bias; indices [out, in] or packed 4-bit [out, ceil(in/2)]."""
    in_features = input.shape[-1]
    if indices.shape[1] != in_features:
        indices = unpack_int4(indices, in_features)
    return F.linear(input, codebook[indices.long()], bias)


def ref_kd_kl_div(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """T**2 * KL(softmax(teacher/T) || softmax(student/T)); "none" gives one value per row."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    # 0 * log 0 = 0 where the teacher gives a class no mass (-inf logit).
    p_teacher = log_p_teacher.exp()
    pointwise = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), torch.zeros_like(p_teacher))
    per_row = pointwise.sum(-1) * t * t
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "batchmean":
        rows = per_row.numel()
        return per_row.sum() / max(rows, 1)
    if reduction == "mean":
        return per_row.sum() / max(student_logits.numel(), 1)
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")


def ref_sparse_codebook_linear(input, row_ptr, col_idx, codes, codebook, bias=None):
    """input @ W.T + bias with W[r, col_idx[k]] = codebook[code(k)] for k in row r's CSR range
    (codes packed 4-bit when codes.numel() != nnz), zero elsewhere: decode to dense, then F.linear."""
    nnz = col_idx.numel()
    if codes.numel() != nnz:
        codes = torch.stack((codes & 0x0F, codes >> 4), 1).reshape(-1)[:nnz]
    out_f = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(out_f, device=row_ptr.device), row_ptr.long().diff(),
                                   output_size=nnz)
    weight = torch.zeros(out_f, input.shape[-1], dtype=codebook.dtype, device=codebook.device)
    weight = weight.index_put((rows, col_idx.long()), codebook[codes.long()])
    return F.linear(input, weight, bias)
