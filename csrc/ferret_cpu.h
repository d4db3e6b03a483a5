// The CPU ops of ferret_kernels._C, shared by ferret_cpu.cpp (implementation) and
// bindings.cpp (the only pybind11 module). Python-facing semantics are documented in
// ferret_kernels/cpu.py, which is the one caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ferret {

// Segment table columns (int64, shape (S, 5)) and block table columns (int64, (L, 4)).
// Fixed here so the Python wrapper and the checks agree on one layout.
enum SegmentColumn { kSegTensor = 0, kSegStart = 1, kSegN = 2, kSegBlock = 3, kSegJ0 = 4, kSegColumns = 5 };
enum BlockColumn { kBlkCount = 0, kBlkId = 1, kBlkCoef = 2, kBlkKBegin = 3, kBlkColumns = 4 };

at::Tensor basis_rows(uint64_t seed, int64_t K, int64_t d, int64_t block, int64_t offset, int64_t k_begin,
                         const std::string& distribution);

at::Tensor project(const std::vector<at::Tensor>& views, const at::Tensor& segments,
                      const at::Tensor& blocks, int64_t total_count, uint64_t seed,
                      const std::string& distribution);

// blocks holds one group of L rows per seed; seeds are replayed in order into one
// float32 accumulator per element, rounded into the output once.
void reconstruct_(const std::vector<at::Tensor>& views, const at::Tensor& segments,
                  const at::Tensor& blocks, const at::Tensor& gamma, const std::vector<uint64_t>& seeds,
                  double alpha, const std::string& distribution);

double generate_sum(uint64_t seed, int64_t K, int64_t d, const std::string& distribution);

// Which code path the ifunc resolver picked on this host ("avx512f", "avx2", "default").
std::string simd_target();

}  // namespace ferret
