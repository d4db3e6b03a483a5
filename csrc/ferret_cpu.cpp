// The C++ CPU backend's ops (declared in ferret_cpu.h, bound in bindings.cpp): argument
// and table checks, work units, tiles and threads, over the per-tile kernels of
// cpu_kernels.h.
//
//  * Work is cut into units of kUnit block elements that depend only on the layout,
//    never on the thread count; OpenMP spreads units over threads. Reconstruct writes
//    each element from exactly one unit, and project writes one partial sum per (unit,
//    basis) that is then added in unit order, so results are the same for any number of
//    threads. Project's per-unit sums use fixed lanes (16 or 32 explicit accumulators,
//    in the same order on every ISA) rather than an omp reduction.
#include "ferret_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace ferret {

namespace {

// Work unit for threads (a multiple of both tiles). 32768 elements gives 32+ units at
// d = 2**20, plenty for 2..16 threads, while project's partial-sum table stays at
// count/32768 floats per element.
constexpr int64_t kUnit = 32768;
// Bases per project work item: lanes for 64 bases are 8 KiB, next to the x tile in L1.
constexpr int64_t kKChunk = 64;
constexpr int64_t kMaxElement = int64_t(1) << 62;
constexpr int64_t kMax32 = int64_t(1) << 32;

}  // namespace

namespace {

Dist parse_distribution(const std::string& name) {
  if (name == "gaussian") return Dist::kGaussian;
  if (name == "rademacher") return Dist::kRademacher;
  TORCH_CHECK(false, "distribution must be 'gaussian' or 'rademacher'; got '", name, "'");
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kF32;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kHalf:
      return DType::kF16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), "; supported: float32, bfloat16, float16");
  }
}

int64_t element_size(DType d) { return d == DType::kF32 ? 4 : 2; }

// A table from Python: int64, CPU, contiguous, (rows, columns).
void check_table(const at::Tensor& t, int64_t columns, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor; got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == columns, name, " must have shape (rows, ", columns, "); got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Everything a unit needs, checked once.
// The block table holds one group of n_blocks rows per seed (reconstruct may replay
// several seeds in one pass); project and basis use a single seed.
struct Problem {
  Dist dist;
  PhiloxKey key;
  std::vector<PhiloxKey> keys;
  std::vector<char*> data;
  std::vector<DType> dtype;
  const int64_t* seg = nullptr;
  const int64_t* blk = nullptr;
  int64_t n_seg = 0;
  int64_t n_blocks = 0;

  Problem(const std::vector<uint64_t>& seeds, Dist d) : dist(d), key(seeds.at(0)) {
    for (uint64_t seed : seeds) keys.emplace_back(seed);
  }
  int64_t n_seeds() const { return static_cast<int64_t>(keys.size()); }
  const int64_t* segment(int64_t s) const { return seg + s * kSegColumns; }
  const int64_t* block_row(int64_t b) const { return blk + b * kBlkColumns; }
  const int64_t* block_row(int64_t seed, int64_t b) const { return block_row(seed * n_blocks + b); }
};

Problem make_problem(const std::vector<at::Tensor>& views, const at::Tensor& segments, const at::Tensor& blocks,
                     int64_t coef_length, const std::vector<uint64_t>& seeds, const std::string& distribution) {
  TORCH_CHECK(!seeds.empty(), "seeds is empty: give at least one seed");
  Problem p(seeds, parse_distribution(distribution));
  TORCH_CHECK(!views.empty(), "views is empty: give at least one tensor");
  for (size_t i = 0; i < views.size(); ++i) {
    const at::Tensor& v = views[i];
    TORCH_CHECK(v.defined(), "views[", i, "] is undefined");
    TORCH_CHECK(v.device().is_cpu(), "views[", i, "] must be a CPU tensor; got ", v.device());
    TORCH_CHECK(v.is_contiguous(), "views[", i, "] must be contiguous");
    p.dtype.push_back(dtype_of(v));
    p.data.push_back(static_cast<char*>(v.data_ptr()));
  }
  check_table(segments, kSegColumns, "segments");
  check_table(blocks, kBlkColumns, "blocks");
  p.seg = segments.data_ptr<int64_t>();
  p.blk = blocks.data_ptr<int64_t>();
  p.n_seg = segments.size(0);
  const int64_t n_rows = blocks.size(0);
  TORCH_CHECK(n_rows % p.n_seeds() == 0, "blocks has ", n_rows, " rows, not one group of blocks per seed (",
              p.n_seeds(), " seeds)");
  const int64_t n_blocks = n_rows / p.n_seeds();
  p.n_blocks = n_blocks;
  // Sums are compared as differences so that hostile values cannot overflow int64.
  for (int64_t b = 0; b < n_rows; ++b) {
    const int64_t* r = p.block_row(b);
    TORCH_CHECK(r[kBlkCount] >= 0 && r[kBlkCount] < kMax32, "blocks[", b, "]: count must be in [0, 2**32)");
    TORCH_CHECK(r[kBlkId] >= 0 && r[kBlkId] < kMax32, "blocks[", b, "]: block id must be in [0, 2**32)");
    TORCH_CHECK(r[kBlkCoef] >= 0 && r[kBlkCoef] <= coef_length - r[kBlkCount], "blocks[", b, "]: coefficients [",
                r[kBlkCoef], ", ", r[kBlkCoef], " + ", r[kBlkCount], ") exceed the ", coef_length, " available");
    TORCH_CHECK(r[kBlkKBegin] >= 0 && r[kBlkKBegin] <= kMax32 - r[kBlkCount], "blocks[", b,
                "]: bases k_begin + count must be <= 2**32");
  }
  for (int64_t s = 0; s < p.n_seg; ++s) {
    const int64_t* r = p.segment(s);
    TORCH_CHECK(r[kSegTensor] >= 0 && r[kSegTensor] < static_cast<int64_t>(views.size()), "segments[", s,
                "]: tensor index ", r[kSegTensor], " out of range for ", views.size(), " views");
    TORCH_CHECK(r[kSegBlock] >= 0 && r[kSegBlock] < n_blocks, "segments[", s, "]: block ", r[kSegBlock],
                " out of range for ", n_blocks, " blocks");
    const int64_t numel = views[r[kSegTensor]].numel();
    TORCH_CHECK(r[kSegN] >= 0 && r[kSegStart] >= 0 && r[kSegStart] <= numel - r[kSegN], "segments[", s,
                "]: elements [", r[kSegStart], ", ", r[kSegStart], " + ", r[kSegN], ") are outside views[",
                r[kSegTensor], "] of ", numel, " elements");
    TORCH_CHECK(r[kSegJ0] >= 0 && r[kSegN] <= kMaxElement && r[kSegJ0] <= kMaxElement - r[kSegN], "segments[", s,
                "]: block elements must lie in [0, 2**62)");
  }
  return p;
}

// A piece of one segment: block elements [jb, je), one thread's work.
struct Unit {
  int64_t seg;
  int64_t jb, je;
  int64_t partial;  // project: first of count partial sums
};

// Units at multiples of kUnit in block coordinates: a pure function of the layout.
std::vector<Unit> make_units(const Problem& p, int64_t* partial_total) {
  std::vector<Unit> units;
  int64_t partial = 0;
  for (int64_t s = 0; s < p.n_seg; ++s) {
    const int64_t* r = p.segment(s);
    const int64_t count = p.block_row(r[kSegBlock])[kBlkCount];
    int64_t any_count = 0;
    for (int64_t g = 0; g < p.n_seeds(); ++g) any_count = std::max(any_count, p.block_row(g, r[kSegBlock])[kBlkCount]);
    if (r[kSegN] == 0 || any_count == 0) continue;
    const int64_t j0 = r[kSegJ0], j1 = r[kSegJ0] + r[kSegN];
    for (int64_t u = j0 - j0 % kUnit; u < j1; u += kUnit) {
      units.push_back(Unit{s, std::max(u, j0), std::min(u + kUnit, j1), partial});
      partial += count;
    }
  }
  if (partial_total) *partial_total = partial;
  return units;
}

// The calls of the tile at ts that cover block elements [lo, hi): the buffer starts at
// element e0 = per_call * call0 and holds ncalls calls. Gaussian call ranges are
// widened to whole 16-call groups.
struct TileCalls {
  uint64_t call0;
  int64_t ncalls;
  int64_t e0;
};

TileCalls tile_calls(Dist dist, int64_t ts, int64_t lo, int64_t hi) {
  if (dist == Dist::kGaussian) {
    const int64_t first = ((lo - ts) / 4) & ~(kLanes - 1);
    const int64_t end = (((hi - ts + 3) / 4) + kLanes - 1) & ~(kLanes - 1);
    return TileCalls{static_cast<uint64_t>(ts / 4 + first), end - first, ts + 4 * first};
  }
  const int64_t first = (lo - ts) / 128;
  const int64_t end = (hi - ts + 127) / 128;
  return TileCalls{static_cast<uint64_t>(ts / 128 + first), end - first, ts + 128 * first};
}

int64_t tile_size(Dist d) { return d == Dist::kGaussian ? kGaussTile : kRadTile; }
int64_t per_call(Dist d) { return d == Dist::kGaussian ? 4 : 128; }

// OpenMP over independent items, dynamically scheduled (items can be ragged); which
// thread runs an item never changes what it computes. Follows torch.set_num_threads.
template <class F>
void parallel_items(int64_t n, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads))
  for (int64_t i = 0; i < n; ++i) f(i);
}

// Project one unit onto bases [kf, kf + kc) of its block: out[i] = partial sum for kf + i.
void project_unit(const Problem& p, const Unit& u, int64_t kf, int64_t kc, float* out) {
  const int64_t* r = p.segment(u.seg);
  const int64_t* b = p.block_row(r[kSegBlock]);
  const uint32_t block = static_cast<uint32_t>(b[kBlkId]);
  const uint32_t k_first = static_cast<uint32_t>(b[kBlkKBegin] + kf);
  const DType dtype = p.dtype[r[kSegTensor]];
  // Block element j of this segment is tensor element start + (j - j0).
  const char* seg_data = p.data[r[kSegTensor]] + r[kSegStart] * element_size(dtype);
  const int64_t j0 = r[kSegJ0];
  const int64_t T = tile_size(p.dist), pc = per_call(p.dist);
  const int64_t lanes = p.dist == Dist::kGaussian ? kLanes : kBits;
  alignas(64) float xbuf[kRadTile];
  alignas(64) float planes[kGaussTile];
  std::vector<float> lane_acc(static_cast<size_t>(kc * lanes), 0.0f);
  for (int64_t ts = u.jb - u.jb % T; ts < u.je; ts += T) {
    const int64_t lo = std::max(ts, u.jb), hi = std::min(ts + T, u.je);
    const TileCalls tc = tile_calls(p.dist, ts, lo, hi);
    const int64_t len = tc.ncalls * pc;
    // Zero padding outside the segment adds exact zeros to the sums.
    std::fill(xbuf, xbuf + (lo - tc.e0), 0.0f);
    kernels::load_f32(seg_data + (lo - j0) * element_size(dtype), dtype, hi - lo, xbuf + (lo - tc.e0));
    std::fill(xbuf + (hi - tc.e0), xbuf + len, 0.0f);
    if (p.dist == Dist::kGaussian) {
      kernels::deinterleave4(xbuf, tc.ncalls, planes);
      kernels::project_gaussian(p.key, block, k_first, kc, tc.call0, tc.ncalls, planes, lane_acc.data());
    } else {
      kernels::project_rademacher(p.key, block, k_first, kc, tc.call0, tc.ncalls, xbuf, lane_acc.data());
    }
  }
  for (int64_t i = 0; i < kc; ++i) {
    float s = 0.0f;
    for (int64_t l = 0; l < lanes; ++l) s = s + lane_acc[i * lanes + l];
    out[i] = s;
  }
}

// Accumulates seed by seed (in table order), k ascending within each, then rounds once.
void reconstruct_unit(const Problem& p, const Unit& u, const float* gamma, float alpha) {
  const int64_t* r = p.segment(u.seg);
  const DType dtype = p.dtype[r[kSegTensor]];
  char* seg_data = p.data[r[kSegTensor]] + r[kSegStart] * element_size(dtype);
  const int64_t j0 = r[kSegJ0];
  const int64_t T = tile_size(p.dist), pc = per_call(p.dist);
  alignas(64) float acc[kRadTile];
  alignas(64) float flat[kGaussTile];
  for (int64_t ts = u.jb - u.jb % T; ts < u.je; ts += T) {
    const int64_t lo = std::max(ts, u.jb), hi = std::min(ts + T, u.je);
    const TileCalls tc = tile_calls(p.dist, ts, lo, hi);
    std::fill(acc, acc + tc.ncalls * pc, 0.0f);
    const float* result;
    for (int64_t g = 0; g < p.n_seeds(); ++g) {
      const int64_t* b = p.block_row(g, r[kSegBlock]);
      const uint32_t block = static_cast<uint32_t>(b[kBlkId]);
      const uint32_t k_first = static_cast<uint32_t>(b[kBlkKBegin]);
      const float* coef = gamma + b[kBlkCoef];
      if (p.dist == Dist::kGaussian) {
        kernels::reconstruct_gaussian(p.keys[g], block, k_first, b[kBlkCount], coef, tc.call0, tc.ncalls, acc);
      } else {
        kernels::reconstruct_rademacher(p.keys[g], block, k_first, b[kBlkCount], coef, tc.call0, tc.ncalls, acc);
      }
    }
    if (p.dist == Dist::kGaussian) {
      kernels::interleave4(acc, tc.ncalls, flat);
      result = flat;
    } else {
      result = acc;
    }
    kernels::update_out(seg_data + (lo - j0) * element_size(dtype), dtype, hi - lo, result + (lo - tc.e0), alpha);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------
// Ops.

at::Tensor basis_rows(uint64_t seed, int64_t K, int64_t d, int64_t block, int64_t offset, int64_t k_begin,
                      const std::string& distribution) {
  const Dist dist = parse_distribution(distribution);
  TORCH_CHECK(K >= 0 && d >= 0, "K and d must be >= 0; got K=", K, ", d=", d);
  TORCH_CHECK(block >= 0 && block < kMax32, "block must be in [0, 2**32); got ", block);
  TORCH_CHECK(K <= kMax32 && k_begin >= 0 && k_begin <= kMax32 - K, "k_begin + K must be <= 2**32; got ", k_begin,
              " + ", K);
  TORCH_CHECK(offset >= 0 && d <= kMaxElement && offset <= kMaxElement - d, "offset + d must be <= 2**62");
  at::Tensor out = at::empty({K, d}, at::TensorOptions().dtype(at::kFloat));
  if (K == 0 || d == 0) return out;
  float* data = out.data_ptr<float>();
  const PhiloxKey key(seed);
  const int64_t units = (offset + d - 1) / kUnit - offset / kUnit + 1;
  const int64_t u0 = offset / kUnit;
  const int64_t T = tile_size(dist);
  parallel_items(K * units, [&](int64_t item) {
    const int64_t k = item / units, u = u0 + item % units;
    const int64_t jb = std::max(u * kUnit, offset), je = std::min((u + 1) * kUnit, offset + d);
    float* row = data + k * d;  // element i is block element offset + i
    alignas(64) float buf[kRadTile];
    alignas(64) float flat[kGaussTile];
    for (int64_t ts = jb - jb % T; ts < je; ts += T) {
      const int64_t lo = std::max(ts, jb), hi = std::min(ts + T, je);
      const TileCalls tc = tile_calls(dist, ts, lo, hi);
      const float* values;
      if (dist == Dist::kGaussian) {
        kernels::generate_gaussian(key, static_cast<uint32_t>(block), static_cast<uint32_t>(k_begin + k), tc.call0,
                                   tc.ncalls, buf);
        kernels::interleave4(buf, tc.ncalls, flat);
        values = flat;
      } else {
        kernels::generate_rademacher(key, static_cast<uint32_t>(block), static_cast<uint32_t>(k_begin + k),
                                     tc.call0, tc.ncalls, buf);
        values = buf;
      }
      std::memcpy(row + (lo - offset), values + (lo - tc.e0), static_cast<size_t>(hi - lo) * sizeof(float));
    }
  });
  return out;
}

at::Tensor project(const std::vector<at::Tensor>& views, const at::Tensor& segments, const at::Tensor& blocks,
                   int64_t total_count, uint64_t seed, const std::string& distribution) {
  TORCH_CHECK(total_count >= 0, "total_count must be >= 0; got ", total_count);
  const Problem p = make_problem(views, segments, blocks, total_count, {seed}, distribution);
  int64_t n_partial = 0;
  const std::vector<Unit> units = make_units(p, &n_partial);
  std::vector<float> partial(static_cast<size_t>(n_partial));
  // Items: (unit, chunk of kKChunk bases); each writes its own slice of `partial`.
  std::vector<int64_t> item_unit, item_k;
  for (size_t i = 0; i < units.size(); ++i) {
    const int64_t count = p.block_row(p.segment(units[i].seg)[kSegBlock])[kBlkCount];
    for (int64_t k = 0; k < count; k += kKChunk) {
      item_unit.push_back(static_cast<int64_t>(i));
      item_k.push_back(k);
    }
  }
  parallel_items(static_cast<int64_t>(item_unit.size()), [&](int64_t item) {
    const Unit& u = units[item_unit[item]];
    const int64_t count = p.block_row(p.segment(u.seg)[kSegBlock])[kBlkCount];
    const int64_t kf = item_k[item], kc = std::min(kKChunk, count - kf);
    project_unit(p, u, kf, kc, partial.data() + u.partial + kf);
  });
  // Fixed-order reduction: units in layout order, so the bits never depend on threads.
  at::Tensor gamma = at::zeros({total_count}, at::TensorOptions().dtype(at::kFloat));
  float* g = gamma.data_ptr<float>();
  for (const Unit& u : units) {
    const int64_t* b = p.block_row(p.segment(u.seg)[kSegBlock]);
    for (int64_t i = 0; i < b[kBlkCount]; ++i) g[b[kBlkCoef] + i] = g[b[kBlkCoef] + i] + partial[u.partial + i];
  }
  return gamma;
}

void reconstruct_(const std::vector<at::Tensor>& views, const at::Tensor& segments, const at::Tensor& blocks,
                  const at::Tensor& gamma, const std::vector<uint64_t>& seeds, double alpha,
                  const std::string& distribution) {
  TORCH_CHECK(gamma.defined(), "gamma is undefined");
  TORCH_CHECK(gamma.device().is_cpu(), "gamma must be a CPU tensor; got ", gamma.device());
  TORCH_CHECK(gamma.scalar_type() == at::kFloat, "gamma must be float32; got ", gamma.scalar_type());
  TORCH_CHECK(gamma.dim() == 1, "gamma must be 1-D; got shape ", gamma.sizes());
  TORCH_CHECK(gamma.is_contiguous(), "gamma must be contiguous");
  const Problem p = make_problem(views, segments, blocks, gamma.numel(), seeds, distribution);
  const std::vector<Unit> units = make_units(p, nullptr);
  const float* g = gamma.data_ptr<float>();
  // alpha is rounded to float32 once, as the reference's torch.tensor(alpha, float32).
  const float alpha32 = static_cast<float>(alpha);
  parallel_items(static_cast<int64_t>(units.size()),
                 [&](int64_t i) { reconstruct_unit(p, units[i], g, alpha32); });
}

double generate_sum(uint64_t seed, int64_t K, int64_t d, const std::string& distribution) {
  const Dist dist = parse_distribution(distribution);
  TORCH_CHECK(K >= 0 && K <= kMax32, "K must be in [0, 2**32]; got ", K);
  TORCH_CHECK(d >= 0 && d <= kMaxElement, "d must be in [0, 2**62]; got ", d);
  const PhiloxKey key(seed);
  const int64_t units = (d + kUnit - 1) / kUnit;
  const int64_t T = tile_size(dist);
  std::vector<double> partial(static_cast<size_t>(units), 0.0);
  parallel_items(units, [&](int64_t u) {
    const int64_t jb = u * kUnit, je = std::min(jb + kUnit, d);
    alignas(64) float lanes[kBits] = {};
    double tail = 0.0;
    for (int64_t ts = jb; ts < je; ts += T) {
      const int64_t hi = std::min(ts + T, je);
      const TileCalls tc = tile_calls(dist, ts, ts, hi);
      if (hi - ts == T) {
        if (dist == Dist::kGaussian) {
          kernels::sum_gaussian(key, 0, 0, K, tc.call0, tc.ncalls, lanes);
        } else {
          kernels::sum_rademacher(key, 0, 0, K, tc.call0, tc.ncalls, lanes);
        }
        continue;
      }
      // The last, partial tile: its calls cover more than d elements, so sum only the
      // first hi - ts values (at most one tile per call, off the hot path).
      alignas(64) float buf[kRadTile];
      alignas(64) float flat[kGaussTile];
      for (int64_t k = 0; k < K; ++k) {
        const float* values = buf;
        if (dist == Dist::kGaussian) {
          kernels::generate_gaussian(key, 0, static_cast<uint32_t>(k), tc.call0, tc.ncalls, buf);
          kernels::interleave4(buf, tc.ncalls, flat);
          values = flat;
        } else {
          kernels::generate_rademacher(key, 0, static_cast<uint32_t>(k), tc.call0, tc.ncalls, buf);
        }
        for (int64_t i = 0; i < hi - ts; ++i) tail += values[i];
      }
    }
    double s = tail;
    for (float v : lanes) s += v;
    partial[u] = s;
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

}  // namespace ferret
