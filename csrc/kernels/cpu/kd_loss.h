// Fused distillation loss, CPU kernel (torch-free).
//
// Per row r of [rows, classes] logits s (student) and t (teacher), with a = s/T, b = t/T:
//   loss[r] = w_r * T^2 * KL(softmax(b) || softmax(a))
//   grad[r] = w_r * T * grad_scale * (softmax(a) - softmax(b))        (d loss / d s, scaled)
// computed in one pass over the inputs: per block of the row, a max of both inputs (the
// block stays in L1), then one exponential per element per input; the exponentials are
// kept (in the gradient row and a per-thread scratch row, both cache-resident) and reused
// for the gradient once the row's log-sum-exp is known. Rows with w_r == 0 give loss 0 and
// a zero gradient whatever their logits hold.
//
// At few classes (C <= 64) the per-row work would dominate, so W rows (the SIMD width) are
// processed together instead: W x W tiles transposed in registers so that each lane holds
// one row, with the same formulas per lane as the single-block case above (for groups of
// ordinary rows the final logarithm and divisions too run as vector float operations).
#pragma once
#include <cstdint>

namespace torchslim {
namespace cpu {

enum class KdDtype : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

struct KdLossParams {
  KdDtype dtype = KdDtype::F32;  // element type of student, teacher and grad
  const void* student = nullptr;
  const void* teacher = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t student_row_stride = 0;  // elements between rows; the class dim is contiguous
  int64_t teacher_row_stride = 0;
  // Optional [rows] weights, double for F64 and float otherwise (nullptr: all 1).
  const void* row_weight = nullptr;
  double temperature = 1.0;
  double grad_scale = 1.0;  // reduction factor: 1 (sum, none), 1/D (batchmean), 1/(D*C) (mean)
  void* grad = nullptr;     // optional [rows, classes] contiguous output, same dtype as the logits
  double* row_loss = nullptr;  // optional [rows] output
  // Write the gradient with non-temporal (streaming) stores and keep both rows of
  // exponentials in the scratch instead: for gradients far larger than the caches, this
  // saves reading every gradient line before writing it.
  bool stream_grad = false;
};

// Processes rows [begin, end) and returns the sum of their losses; disjoint ranges may run
// on different threads. Picks the AVX-512 / AVX2 / scalar body from simd_level() at run time.
double kd_loss_rows(const KdLossParams& p, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace torchslim
