// CPU helper of the fused sparse MLP inference op (torch-free). The per-layer products and
// the structure check reuse the masked sparse linear kernels (masked_linear.h); this is
// the piece the chain adds: the activation pass.
#pragma once
#include <cstdint>

namespace torchslim {
namespace cpu {
namespace sparse_mlp {

// y[i] = max(y[i], 0) for i < n; NaN stays NaN (as torch.relu). Returns whether every
// y[i] is finite after the pass (so the caller knows if the next layer needs the
// non-finite fix-up).
template <typename T>
bool relu_all_finite(T* y, int64_t n, bool relu);

}  // namespace sparse_mlp
}  // namespace cpu
}  // namespace torchslim
