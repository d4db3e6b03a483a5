// The CPU kernels of ferret_kernels._C: Philox and the float stages of the RNG contract,
// vectorised per ISA, and the per-tile loops of basis / project / reconstruct built on
// them. Implemented in cpu_kernels.cpp (every ISA version, picked once at load time);
// ferret_cpu.cpp schedules tiles onto threads and calls them.
#pragma once

#include <cstdint>

#include "philox.h"

namespace ferret {

enum class Dist { kGaussian, kRademacher };
enum class DType { kF32, kBF16, kF16 };

// Calls per lane group of the gaussian project / roofline sums: one AVX-512 register.
inline constexpr int64_t kLanes = 16;
// Rademacher lanes: the 32 bits of one Philox word.
inline constexpr int64_t kBits = 32;
// Tiles, in block elements, aligned to multiples of themselves so a tile never splits a
// Philox call (4 or 128 elements). Gaussian: 256 calls, 4 planes of 1 KiB. Rademacher:
// 16 calls, which is exactly one 16-lane Philox group.
inline constexpr int64_t kGaussTile = 1024;
inline constexpr int64_t kRadTile = 2048;
inline constexpr int64_t kGaussCalls = kGaussTile / 4;
inline constexpr int64_t kRadCalls = kRadTile / 128;

// One tile of work each; calls are numbered from call0, ncalls <= kGaussCalls (a
// multiple of 16) for gaussian and <= kRadCalls for Rademacher. Gaussian values and
// inputs come as 4 planes: element 4c + q of the tile in plane q at index c.
namespace kernels {

// lane_acc[i * kLanes + l] += partial dot of basis k_first + i with x, lane l.
void project_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0,
                      int64_t ncalls, const float* xp, float* lane_acc);
// lane_acc[i * kBits + b] += partial dot of basis k_first + i with x, lane b.
void project_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0,
                        int64_t ncalls, const float* x, float* lane_acc);
// The reconstruct contract: for each basis i in order, acc = acc + coef[i] * v_{k_first+i}.
void reconstruct_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, const float* coef,
                          uint64_t call0, int64_t ncalls, float* accp);
void reconstruct_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, const float* coef,
                            uint64_t call0, int64_t ncalls, float* acc);
// Generation-only roofline: lanes += the values of kc bases (no input read).
void sum_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0, int64_t ncalls,
                  float* lanes);
void sum_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0,
                    int64_t ncalls, float* lanes);
// One basis row's values over the tile (gaussian as planes).
void generate_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0, int64_t ncalls,
                       float* planes);
void generate_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0, int64_t ncalls,
                         float* out);
// Between element order and planes.
void deinterleave4(const float* x, int64_t ncalls, float* planes);
void interleave4(const float* planes, int64_t ncalls, float* x);
// dst = n values of ``src`` (float32 / bfloat16 / float16) as float32.
void load_f32(const void* src, DType dtype, int64_t n, float* dst);
// out = round_to_dtype(float(out) + alpha * acc), the last step of the contract.
void update_out(void* dst, DType dtype, int64_t n, const float* acc, float alpha);

}  // namespace kernels

}  // namespace ferret
