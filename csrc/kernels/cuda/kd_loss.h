// Fused distillation loss, CUDA launcher (torch-free; compiled only with TORCHSLIM_WITH_CUDA).
// Same contract as the CPU kernel (kernels/cpu/kd_loss.h): per row r,
//   row_loss[r] = w_r * T^2 * KL(softmax(t/T) || softmax(s/T))
//   grad[r]     = w_r * T * (*grad_scale) * (softmax(s/T) - softmax(t/T))
// with one block per row (a warp per row for small C), vectorised loads and warp-shuffle
// reductions, launched on the given stream.
#pragma once
#include <cstdint>

namespace torchslim {
namespace cuda {

struct KdLossCudaParams {
  int dtype = 0;  // 0 float32, 1 float64, 2 float16, 3 bfloat16 (as cpu::KdDtype)
  const void* student = nullptr;
  const void* teacher = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t student_row_stride = 0;  // elements; the class dim is contiguous
  int64_t teacher_row_stride = 0;
  const void* row_weight = nullptr;  // [rows] float (double for float64), or nullptr
  double temperature = 1.0;
  const float* grad_scale = nullptr;  // device scalar: the reduction factor (1, 1/D, 1/(D*C))
  void* grad = nullptr;               // [rows, classes] contiguous, or nullptr
  void* row_loss = nullptr;           // [rows] float (double for float64)
};

// Launches on `stream` (a cudaStream_t; void* keeps this header free of CUDA headers).
// Returns nullptr on success, else the CUDA error string.
const char* kd_loss_launch(const KdLossCudaParams& p, void* stream);

}  // namespace cuda
}  // namespace torchslim
