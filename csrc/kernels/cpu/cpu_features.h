// Run-time CPU feature detection (torch-free). The extension is compiled for the
// baseline ISA; kernels pick an AVX-512 / AVX2 / scalar body here at run time.
#pragma once

namespace torchslim {
namespace cpu {

enum class SimdLevel : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// Highest level this CPU supports, capped by the environment variable
// TORCHSLIM_SIMD=scalar|avx2|avx512 (read once) so tests can exercise every path.
SimdLevel simd_level();
const char* simd_level_name(SimdLevel level);

}  // namespace cpu
}  // namespace torchslim
