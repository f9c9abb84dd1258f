// Chunk sizes for at::parallel_for in the CPU glue of the sparse ops.
#pragma once
#include <algorithm>
#include <cstdint>

namespace torchslim {

// Work per parallel chunk: enough to amortise waking a thread (~a few microseconds).
constexpr int64_t kGrainWork = 1 << 16;

// Rows per chunk for a CSR of nnz entries over `rows` rows, each entry worth per_entry
// units of work (1 at batch 1, the padded batch for the batched kernels).
inline int64_t grain_rows(int64_t nnz, int64_t rows, int64_t per_entry) {
  const int64_t per_row = std::max<int64_t>(1, (nnz / std::max<int64_t>(rows, 1) + 1) * per_entry);
  return std::max<int64_t>(1, kGrainWork / per_row);
}

}  // namespace torchslim
