// Each op's glue file (csrc/ops/<op>.cpp) defines its schemas in one function that the
// single TORCH_LIBRARY(torchslim, m) block in csrc/module.cpp calls, so every schema of
// the library is declared in one place while each op's code stays in its own file.
#pragma once
#include <torch/library.h>

namespace torchslim {
void define_masked_linear_ops(torch::Library& m);
void define_codebook_linear_ops(torch::Library& m);
void define_kd_loss_ops(torch::Library& m);
void define_sparse_mlp_ops(torch::Library& m);
void define_sparse_codebook_linear_ops(torch::Library& m);
}  // namespace torchslim
