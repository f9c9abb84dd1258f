// The view of codebook_linear's index matrix that the CPU and the CUDA kernels share
// (torch-free): uint8 [out, in] ("unpacked") or two 4-bit indices a byte [out, ceil(in/2)]
// ("packed"), on the host or on the device.
#pragma once
#include <cstdint>

namespace torchslim {

struct CodebookIndices {
  const uint8_t* idx;  // row o starts at idx + o * ld
  int64_t ld;          // bytes between rows
  int64_t out;         // rows (output features)
  int64_t in;          // input features (weights per row)
  bool packed;         // 4-bit layout
  int num_clusters;    // K (<= 16 when packed, <= 256 otherwise)
};

}  // namespace torchslim
