// CPU helpers of the fused sparse MLP inference op. See sparse_mlp.h.
#include "kernels/cpu/sparse_mlp.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
#define TS_AVX2 __attribute__((target("avx2,fma")))
#else
#define TS_AVX2
#endif

namespace torchslim {
namespace cpu {
namespace sparse_mlp {

namespace {

// Branch-free bodies (integer exponent test, select) so that the compiler vectorises them;
// the AVX2 clones are picked at run time.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
template <typename T>
constexpr Bits<T> kExponent = sizeof(T) == 4 ? Bits<T>(0x7f800000u) : Bits<T>(0x7ff0000000000000ull);

// One pass: the activation, then the exponent test of the value stored.
#define TS_RELU_BODY                                                          \
  Bits<T> bad = 0;                                                            \
  for (int64_t i = 0; i < n; ++i) {                                           \
    T v = y[i];                                                               \
    if constexpr (Relu) {                                                     \
      v = v < T(0) ? T(0) : v;                                                \
      y[i] = v;                                                               \
    }                                                                         \
    Bits<T> bits;                                                             \
    std::memcpy(&bits, &v, sizeof(T));                                        \
    bad |= (bits & kExponent<T>) == kExponent<T> ? Bits<T>(1) : Bits<T>(0);   \
  }                                                                           \
  return bad == 0;

template <typename T, bool Relu>
bool relu_body(T* y, int64_t n) { TS_RELU_BODY }
template <typename T, bool Relu>
TS_AVX2 bool relu_avx2(T* y, int64_t n) { TS_RELU_BODY }
#undef TS_RELU_BODY

}  // namespace

template <typename T>
bool relu_all_finite(T* y, int64_t n, bool relu) {
#if defined(__x86_64__)
  if (simd_level() != SimdLevel::Scalar) return relu ? relu_avx2<T, true>(y, n) : relu_avx2<T, false>(y, n);
#endif
  return relu ? relu_body<T, true>(y, n) : relu_body<T, false>(y, n);
}

template bool relu_all_finite<float>(float*, int64_t, bool);
template bool relu_all_finite<double>(double*, int64_t, bool);

}  // namespace sparse_mlp
}  // namespace cpu
}  // namespace torchslim
