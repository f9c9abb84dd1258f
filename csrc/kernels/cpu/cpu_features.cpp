#include "kernels/cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace torchslim {
namespace cpu {

static SimdLevel detect() {
  SimdLevel level = SimdLevel::Scalar;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = SimdLevel::AVX2;
  if (level == SimdLevel::AVX2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    level = SimdLevel::AVX512;
  }
#endif
  const char* cap = std::getenv("TORCHSLIM_SIMD");
  if (cap != nullptr) {
    SimdLevel wanted = level;
    if (std::strcmp(cap, "scalar") == 0) wanted = SimdLevel::Scalar;
    else if (std::strcmp(cap, "avx2") == 0) wanted = SimdLevel::AVX2;
    else if (std::strcmp(cap, "avx512") == 0) wanted = SimdLevel::AVX512;
    if (static_cast<int>(wanted) < static_cast<int>(level)) level = wanted;
  }
  return level;
}

SimdLevel simd_level() {
  static const SimdLevel level = detect();
  return level;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::AVX512: return "avx512";
    case SimdLevel::AVX2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace cpu
}  // namespace torchslim
