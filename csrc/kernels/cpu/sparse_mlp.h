// CPU helpers of the fused sparse MLP inference op (torch-free). The per-layer products
// reuse the masked sparse linear kernels (masked_linear.h); these are the pieces the chain
// adds: validation of a CSR block before any of it is read, and the activation pass.
#pragma once
#include <cstdint>

namespace torchslim {
namespace cpu {
namespace sparse_mlp {

// What is wrong with a CSR block, if anything.
enum class CsrFault : int { None = 0, FirstNotZero, Decreasing, ColumnOutOfRange };

struct CsrCheck {
  CsrFault fault = CsrFault::None;
  int64_t where = -1;  // row (Decreasing) or entry (ColumnOutOfRange) of the first fault
};

// Checks row_ptr[0] == 0, row_ptr non-decreasing over rows + 1 entries, and every
// col[k] (k < row_ptr[rows]) in [0, extent). The caller has checked that row_ptr[rows]
// entries of col exist. One vectorised pass over the indices.
template <typename I>
CsrCheck check_csr(const int32_t* row_ptr, int64_t rows, const I* col, int64_t extent);

// y[i] = max(y[i], 0) for i < n; NaN stays NaN (as torch.relu). Returns whether every
// y[i] is finite after the pass (so the caller knows if the next layer needs the
// non-finite fix-up).
template <typename T>
bool relu_all_finite(T* y, int64_t n, bool relu);

}  // namespace sparse_mlp
}  // namespace cpu
}  // namespace torchslim
