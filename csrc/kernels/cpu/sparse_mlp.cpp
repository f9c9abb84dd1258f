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

// Largest index seen, as unsigned (a negative index becomes huge, so one comparison
// covers both ends). Branch-free so the compiler vectorises it; the AVX2 clone is picked
// at run time.
template <typename I>
uint64_t max_unsigned_body(const I* col, int64_t n) {
  using U = std::make_unsigned_t<I>;
  U m = 0;
  for (int64_t k = 0; k < n; ++k) m = std::max(m, static_cast<U>(col[k]));
  return m;
}
template <typename I>
TS_AVX2 uint64_t max_unsigned_avx2(const I* col, int64_t n) {
  using U = std::make_unsigned_t<I>;
  U m = 0;
  for (int64_t k = 0; k < n; ++k) m = std::max(m, static_cast<U>(col[k]));
  return m;
}
template <typename I>
uint64_t max_unsigned(const I* col, int64_t n) {
#if defined(__x86_64__)
  if (simd_level() != SimdLevel::Scalar) return max_unsigned_avx2(col, n);
#endif
  return max_unsigned_body(col, n);
}

// Branch-free bodies (integer exponent test, select) so that the compiler vectorises them;
// the AVX2 clones are picked at run time.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
template <typename T>
constexpr Bits<T> kExponent = sizeof(T) == 4 ? Bits<T>(0x7f800000u) : Bits<T>(0x7ff0000000000000ull);

#define TS_RELU_BODY                                                 \
  Bits<T> bad = 0;                                                   \
  for (int64_t i = 0; i < n; ++i) {                                  \
    Bits<T> bits;                                                    \
    std::memcpy(&bits, y + i, sizeof(T));                            \
    bad |= static_cast<Bits<T>>((bits & kExponent<T>) == kExponent<T>); \
    if (relu) y[i] = y[i] < T(0) ? T(0) : y[i];                      \
  }                                                                  \
  return bad == 0;

template <typename T>
bool relu_body(T* y, int64_t n, bool relu) { TS_RELU_BODY }
template <typename T>
TS_AVX2 bool relu_avx2(T* y, int64_t n, bool relu) { TS_RELU_BODY }
#undef TS_RELU_BODY

}  // namespace

template <typename I>
CsrCheck check_csr(const int32_t* row_ptr, int64_t rows, const I* col, int64_t extent) {
  CsrCheck out;
  if (row_ptr[0] != 0) {
    out.fault = CsrFault::FirstNotZero;
    out.where = 0;
    return out;
  }
  bool ordered = true;
  for (int64_t r = 0; r < rows; ++r) ordered &= row_ptr[r + 1] >= row_ptr[r];
  if (!ordered) {
    for (int64_t r = 0; r < rows; ++r) {
      if (row_ptr[r + 1] < row_ptr[r]) {
        out.fault = CsrFault::Decreasing;
        out.where = r;
        return out;
      }
    }
  }
  const int64_t nnz = row_ptr[rows];
  if (nnz > 0 && (extent <= 0 || max_unsigned(col, nnz) >= static_cast<uint64_t>(extent))) {
    for (int64_t k = 0; k < nnz; ++k) {
      if (col[k] < 0 || col[k] >= extent) {
        out.fault = CsrFault::ColumnOutOfRange;
        out.where = k;
        return out;
      }
    }
  }
  return out;
}

template <typename T>
bool relu_all_finite(T* y, int64_t n, bool relu) {
#if defined(__x86_64__)
  if (simd_level() != SimdLevel::Scalar) return relu_avx2(y, n, relu);
#endif
  return relu_body(y, n, relu);
}

template CsrCheck check_csr<int16_t>(const int32_t*, int64_t, const int16_t*, int64_t);
template CsrCheck check_csr<int32_t>(const int32_t*, int64_t, const int32_t*, int64_t);
template bool relu_all_finite<float>(float*, int64_t, bool);
template bool relu_all_finite<double>(double*, int64_t, bool);

}  // namespace sparse_mlp
}  // namespace cpu
}  // namespace torchslim
