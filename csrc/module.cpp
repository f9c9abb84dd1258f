// The extension module torchslim._C: the one schema block of the torchslim operator
// library, and the pybind11 module that carries non-tensor helpers (build_info).
#include <pybind11/pybind11.h>

#include "kernels/cpu/cpu_features.h"
#include "ops/path_rules.h"
#include "ops/registration.h"

#ifndef TORCHSLIM_VERSION
#define TORCHSLIM_VERSION "0.0.0+dev"
#endif
#ifndef TORCHSLIM_TORCH_VERSION
#define TORCHSLIM_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(torchslim, m) {
  torchslim::define_masked_linear_ops(m);
  torchslim::define_codebook_linear_ops(m);
  torchslim::define_kd_loss_ops(m);
  torchslim::define_sparse_mlp_ops(m);
  torchslim::define_sparse_codebook_linear_ops(m);
}

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["version"] = TORCHSLIM_VERSION;
  info["torch_version_built"] = TORCHSLIM_TORCH_VERSION;
#ifdef TORCHSLIM_WITH_CUDA
  info["cuda_built"] = true;
#else
  info["cuda_built"] = false;
#endif
  info["simd"] = torchslim::cpu::simd_level_name(torchslim::cpu::simd_level());
#ifdef _OPENMP
  info["openmp"] = true;  // the CPU kernels' at::parallel_for loops use torch's threads
#else
  info["openmp"] = false;  // they run on one thread
#endif
#if defined(__x86_64__)
  info["arch"] = "x86_64";
#elif defined(__aarch64__)
  info["arch"] = "aarch64";
#else
  info["arch"] = "other";
#endif
  info["compiler"] = __VERSION__;
  return info;
}

// The numbers of ops/path_rules.h, for torchslim/_path_rules.py (one source for both sides).
static py::dict path_rules() {
  namespace r = torchslim::rules;
  py::dict d;
  d["masked_small_weight_numel"] = r::kMaskedSmallWeightNumel;
  d["masked_batch1_max_density"] = r::kMaskedBatch1MaxDensity;
  d["masked_batch1_large_max_density"] = r::kMaskedBatch1LargeMaxDensity;
  d["masked_large_weight_bytes"] = r::kMaskedLargeWeightBytes;
  d["masked_max_density"] = r::kMaskedMaxDensity;
  d["masked_max_density_low_precision"] = r::kMaskedMaxDensityLowPrecision;
  d["masked_train_max_density"] = r::kMaskedTrainMaxDensity;
  d["masked_train_small_max_density"] = r::kMaskedTrainSmallMaxDensity;
  d["masked_train_min_batch"] = r::kMaskedTrainMinBatch;
  return d;
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "torchslim compiled kernels (ops are registered as torch.ops.torchslim.*)";
  mod.def("build_info", &build_info, "What this extension was built with and the SIMD level chosen at run time.");
  mod.def("path_rules", &path_rules, "The masked sparse linear op's dense/sparse crossovers (ops/path_rules.h).");
  mod.def("masked_sparse_faster", &torchslim::rules::masked_sparse_faster, py::arg("density"), py::arg("batch"),
          py::arg("weight_numel"), py::arg("training") = false, py::arg("low_precision") = false,
          "The rule of ops/path_rules.h: does the masked sparse kernel beat the dense product?");
}
