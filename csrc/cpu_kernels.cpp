// The CPU kernels (declared in cpu_kernels.h): everything that runs per tile, per ISA.
//
// Shape of the work:
//  * One build runs on any x86-64 and uses AVX-512 where it exists, with no
//    -march=native: the hot functions come in AVX-512F, AVX2 and baseline versions,
//    picked once at load time by ifunc resolvers (GCC target_clones for the plain-C++
//    loops, C++ function multiversioning where the versions differ in source).
//  * Gaussian on AVX-512 (the hot path here): Philox and Box-Muller are written with
//    intrinsics and fused, two groups of 16 calls in lockstep, and the values go from
//    registers straight into the project / reconstruct consumer. Elsewhere, and for
//    Rademacher, `philox_calls` (intrinsics on AVX2 / AVX-512) writes a tile's Philox
//    words and the float stages of philox.h run as `#pragma omp simd` loops over calls
//    that GCC vectorises whole (checked with -fopt-info-vec and in the assembly).
//    Every path performs the contract's float operations in its order: the tests
//    compare each against the torch reference bit for bit (FERRET_MAX_ISA builds the
//    AVX2 and baseline paths alone, to test them on an AVX-512 host).
//  * A unit is walked in tiles small enough for L1 (x tile or accumulator tile); every
//    basis of the block is regenerated over the tile while it is hot, so each (basis,
//    call) is generated exactly once and x / out are touched once per tile.
#include "cpu_kernels.h"

#include <immintrin.h>

#include <cstring>
#include <string>

#include "ferret_cpu.h"

// FERRET_MAX_ISA caps the code paths built: 2 (the default) AVX-512F + AVX2 + baseline,
// 1 AVX2 + baseline, 0 baseline only. Only for testing the fallbacks on an AVX-512 host
// (build with -DFERRET_MAX_ISA=1); setup.py never sets it.
#ifndef FERRET_MAX_ISA
#define FERRET_MAX_ISA 2
#endif
#if FERRET_MAX_ISA >= 2
#define FERRET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#elif FERRET_MAX_ISA == 1
#define FERRET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FERRET_CLONES
#endif

namespace ferret {

// ---------------------------------------------------------------------------------
// dtype conversions, written on bits so they are exact, vectorise, and do not depend
// on the FTZ/DAZ state (the only float ops used see normal numbers only).

FERRET_INLINE float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN -> 0x7FC0 (the contract, and c10::BFloat16).
FERRET_INLINE uint16_t f32_to_bf16(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : r);
}

// All ones where c holds. The fp16 conversions pick among candidates with these masks
// rather than ?: because a candidate computed with a float op and used in one arm only
// gets sunk into a branch that GCC (under -ftrapping-math) will not if-convert, and
// the loop would stay scalar.
FERRET_INLINE uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }

FERRET_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t body = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t normal = body + 0x38000000u;  // rebias exponent by 127 - 15
  const uint32_t special = body | 0x7F800000u;  // inf / NaN keep their payload
  // Subnormal: mantissa * 2**-24, exact, and a normal float32.
  const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(h & 0x3FFu)) * 0x1p-24f);
  const uint32_t mag = normal ^ ((normal ^ special) & mask_if(e == 0x1Fu)) ^ ((normal ^ sub) & mask_if(e == 0));
  return bits_f32(sign | mag);
}

// Round to nearest even (F. Giesen's float_to_half_fast3_rtne): halves that come out
// subnormal are rounded by the FPU itself by adding 0.5f, whose ulp is exactly the
// half subnormal step. NaN -> 0x7E00 with the sign, as c10::Half.
FERRET_INLINE uint16_t f32_to_f16(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u ^ sign;
  const uint32_t special = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN : overflow to inf
  const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - 0x3F000000u;
  const uint32_t norm = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // rebias, round, shift
  const uint32_t h = norm ^ ((norm ^ special) & mask_if(a >= 0x47800000u)) ^ ((norm ^ sub) & mask_if(a < 0x38800000u));
  return static_cast<uint16_t>(h | (sign >> 16));
}

// ---------------------------------------------------------------------------------
// Philox over a run of calls, one version per ISA.
//
// GCC 12 vectorises a 32x32->64-bit product as a full 64-bit multiply (three vpmuludq
// and fix-ups per 8 lanes), three times the work of the even/odd vpmuludq pair the
// hardware needs, and Philox is ~half of the gaussian work. So this one stage is
// written with intrinsics, as C++ function multiversioning: GCC emits an ifunc that
// picks the AVX-512F, AVX2 or plain version at load time. The AVX2 and baseline float
// stages stay plain C++ that GCC vectorises (philox.h); AVX-512 has its own, below.
namespace kernels {

// Word q of call call0 + c goes to w[q * stride + c], for c < ncalls (a multiple of 16).
__attribute__((target("default"))) void philox_calls(const PhiloxKey& key, uint32_t block, uint32_t k,
                                                     uint64_t call0, int64_t ncalls, uint32_t* __restrict w,
                                                     int64_t stride) {
  const uint32_t base_lo = static_cast<uint32_t>(call0), base_hi = static_cast<uint32_t>(call0 >> 32);
  for (int64_t c = 0; c < ncalls; ++c) {
    const Words4 r = philox_call(call_words(base_lo, base_hi, static_cast<uint32_t>(c)), k, block, key);
    w[c] = r.w0;
    w[stride + c] = r.w1;
    w[2 * stride + c] = r.w2;
    w[3 * stride + c] = r.w3;
  }
}

#if FERRET_MAX_ISA >= 1
__attribute__((target("avx2"))) void philox_calls(const PhiloxKey& key, uint32_t block, uint32_t k,
                                                  uint64_t call0, int64_t ncalls, uint32_t* __restrict w,
                                                  int64_t stride) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  // Round 1 multiplies the constant counter word k: its product is a scalar.
  const uint64_t pk = static_cast<uint64_t>(k) * kPhiloxM1;
  const __m256i hi1_first = _mm256_set1_epi32(static_cast<int>(pk >> 32));
  const __m256i lo1_first = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(pk)));
  const __m256i c3_first = _mm256_set1_epi32(static_cast<int>(block));
  // High words: even lanes from the even products' upper halves (shuffled down), odd
  // lanes straight from the odd products; low words by vpmulld. (A macro: a lambda
  // would not inherit this function's target and could not inline the intrinsics.)
#define FERRET_MULHI256(c, m)                                                                  \
  _mm256_blend_epi32(_mm256_shuffle_epi32(_mm256_mul_epu32((c), (m)), 0xF5),                 \
                     _mm256_mul_epu32(_mm256_shuffle_epi32((c), 0xF5), (m)), 0xAA)
  for (int64_t g = 0; g < ncalls; g += 8) {
    const uint64_t base = call0 + static_cast<uint64_t>(g);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    __m256i c0 = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // Unsigned lo < base_lo (a carry into the high word), via the sign-flip trick.
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), carry);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m256i hi0 = FERRET_MULHI256(c0, m0);
      const __m256i lo0 = _mm256_mullo_epi32(c0, m0);
      const __m256i hi1 = r == 0 ? hi1_first : FERRET_MULHI256(c2, m1);
      const __m256i lo1 = r == 0 ? lo1_first : _mm256_mullo_epi32(c2, m1);
      if (r == 0) c3 = c3_first;
      const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key.k0[r]));
      const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key.k1[r]));
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
      c1 = lo1;
      c3 = lo0;
      c0 = n0;
      c2 = n2;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + g), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + stride + g), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 2 * stride + g), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 3 * stride + g), c3);
  }
#undef FERRET_MULHI256
}

#endif

#if FERRET_MAX_ISA >= 2
#define FERRET_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// Philox of N groups of 16 calls, group i being calls base + 16 i .. base + 16 i + 15
// of basis (block, k), in lockstep: each step is issued for every group before the
// next, so the out-of-order core always has independent work next to the long
// multiply-xor chains (see kGaussGroups). The high words:
// even lanes from the even products' upper halves (shuffled down by a masked vpshufd
// merged into the odd products, whose upper halves already sit in the odd lanes); the
// low words by vpmulld. 5 instructions per 16 products, 12 per round.
template <int N>
FERRET_AVX512 void philox16(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t base, __m512i (*w)[4]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
#define FERRET_MULHI512(c, m)                                                                   \
  _mm512_mask_shuffle_epi32(_mm512_mul_epu32(_mm512_shuffle_epi32((c), _MM_PERM_DDBB), (m)), 0x5555, \
                            _mm512_mul_epu32((c), (m)), _MM_PERM_DDBB)
  // Round 1 multiplies the constant counter word k: a scalar product.
  const uint64_t pk = static_cast<uint64_t>(k) * kPhiloxM1;
  __m512i c0[N], c1[N], c2[N], c3[N];
  for (int i = 0; i < N; ++i) {
    const uint64_t b = base + 16 * static_cast<uint64_t>(i);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b)));
    c0[i] = _mm512_add_epi32(base_lo, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0[i], base_lo);  // low word wrapped
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b >> 32)));
    c1[i] = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    c2[i] = _mm512_setzero_si512();
    c3[i] = _mm512_set1_epi32(static_cast<int>(block));
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(key.k0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(key.k1[r]));
    for (int i = 0; i < N; ++i) {
      const __m512i hi0 = FERRET_MULHI512(c0[i], m0);
      const __m512i lo0 = _mm512_mullo_epi32(c0[i], m0);
      const __m512i hi1 = r == 0 ? _mm512_set1_epi32(static_cast<int>(pk >> 32)) : FERRET_MULHI512(c2[i], m1);
      const __m512i lo1 = r == 0 ? _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(pk)))
                                 : _mm512_mullo_epi32(c2[i], m1);
      c0[i] = _mm512_ternarylogic_epi32(hi1, c1[i], k0, 0x96);  // three-way xor
      c2[i] = _mm512_ternarylogic_epi32(hi0, c3[i], k1, 0x96);
      c1[i] = lo1;
      c3[i] = lo0;
    }
  }
#undef FERRET_MULHI512
  for (int i = 0; i < N; ++i) {
    w[i][0] = c0[i];
    w[i][1] = c1[i];
    w[i][2] = c2[i];
    w[i][3] = c3[i];
  }
}

__attribute__((target("avx512f"))) void philox_calls(const PhiloxKey& key, uint32_t block, uint32_t k,
                                                     uint64_t call0, int64_t ncalls, uint32_t* __restrict w,
                                                     int64_t stride) {
  for (int64_t g = 0; g < ncalls; g += 16) {
    __m512i r[1][4];
    philox16<1>(key, block, k, call0 + static_cast<uint64_t>(g), r);
    for (int q = 0; q < 4; ++q) _mm512_storeu_si512(w + q * stride + g, r[0][q]);
  }
}
#endif

// ---------------------------------------------------------------------------------
// Gaussian values of one basis over a run of calls, one version per ISA: plane q gets
// element 4c + q of call call0 + c, for c < ncalls (a multiple of 16).

// AVX2 and baseline: Philox words into a buffer, then philox.h's float stages as a
// plain loop that GCC vectorises for the caller's target.
FERRET_INLINE void gaussian_planes_portable(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0,
                                            int64_t ncalls, float* __restrict z) {
  alignas(64) uint32_t w[4 * kGaussCalls];
  philox_calls(key, block, k, call0, ncalls, w, ncalls);
#pragma omp simd
  for (int64_t c = 0; c < ncalls; ++c) {
    const Float4 v = gaussian4(w[c], w[ncalls + c], w[2 * ncalls + c], w[3 * ncalls + c]);
    z[c] = v.z0;
    z[ncalls + c] = v.z1;
    z[2 * ncalls + c] = v.z2;
    z[3 * ncalls + c] = v.z3;
  }
}

__attribute__((target("default"))) void gaussian_planes(const PhiloxKey& key, uint32_t block, uint32_t k,
                                                        uint64_t call0, int64_t ncalls, float* __restrict z) {
  gaussian_planes_portable(key, block, k, call0, ncalls, z);
}

#if FERRET_MAX_ISA >= 1
__attribute__((target("avx2"))) void gaussian_planes(const PhiloxKey& key, uint32_t block, uint32_t k,
                                                     uint64_t call0, int64_t ncalls, float* __restrict z) {
  gaussian_planes_portable(key, block, k, call0, ncalls, z);
}
#endif

#if FERRET_MAX_ISA >= 2
// e * LN2_LO and e * LN2_HI of log_unit for every exponent e in [-31, 0], at index
// e + 31: the same float32 products the reference computes (constant-folded with
// IEEE rounding), looked up by one vpermt2ps each instead of a convert and two
// multiplies per Box-Muller pair.
struct LogExponentTables {
  alignas(64) float lo[32];
  alignas(64) float hi[32];
  constexpr LogExponentTables() : lo{}, hi{} {
    for (int j = 0; j < 32; ++j) {
      const float e = static_cast<float>(j - 31);
      lo[j] = e * kLn2Lo;
      hi[j] = e * kLn2Hi;
    }
  }
};
constexpr LogExponentTables kLogExponent{};

// philox.h's box_muller on N vectors of 16 lanes in lockstep (see philox16), operation
// for operation, with these exact rewrites (each gives the same bits):
//  * u = (2n+1) * 2**-24 is never formed: it only feeds log_unit's integer add, and
//    bits(u) = bits(float(2n+1)) - (24 << 23) exactly, so the shift joins that add.
//  * log_unit's e = (ix >> 23) - 127 only enters as e * LN2_LO and e * LN2_HI: those
//    come from kLogExponent, indexed by ix >> 23 (vpermt2ps uses its low 5 bits, and
//    (e + 127) mod 32 = e + 31 for e in [-31, 0]).
//  * the angle (odd * 2**-22) * HALF_PI is odd * (HALF_PI * 2**-22): scaling by a
//    power of two is exact, so both round the same real number once.
//  * the quadrant logic of cos_sin_turn as in philox.h, on mask registers.
// zc[i], zs[i] are radius * cos and radius * sin for radius word wr[i], angle word wa[i].
template <int N>
FERRET_AVX512 void box_muller16(const __m512i* wr, const __m512i* wa, const __m512 tables[4], __m512* zc,
                                __m512* zs) {
#define FERRET_EACH for (int i = 0; i < N; ++i)
  const __m512i one = _mm512_set1_epi32(1);
  __m512i ix[N];
  __m512 e_lo[N], e_hi[N], f[N], z[N], y[N], radius[N];
  // Radius: sqrt(-2 log u).
  FERRET_EACH ix[i] = _mm512_add_epi32(
      _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(wr[i], 8), one))),
      _mm512_set1_epi32(static_cast<int>(0x3F800000u - 0x3F3504F3u - (24u << 23))));
  FERRET_EACH {
    const __m512i e_index = _mm512_srli_epi32(ix[i], 23);
    e_lo[i] = _mm512_permutex2var_ps(tables[0], e_index, tables[1]);
    e_hi[i] = _mm512_permutex2var_ps(tables[2], e_index, tables[3]);
  }
  FERRET_EACH f[i] = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_add_epi32(
                                       _mm512_and_si512(ix[i], _mm512_set1_epi32(0x7FFFFF)), _mm512_set1_epi32(0x3F3504F3))),
                                   _mm512_set1_ps(1.0f));
  FERRET_EACH z[i] = _mm512_mul_ps(f[i], f[i]);
  FERRET_EACH y[i] = _mm512_mul_ps(_mm512_set1_ps(kLogP0), f[i]);
  for (const float p : {kLogP1, kLogP2, kLogP3, kLogP4, kLogP5, kLogP6, kLogP7, kLogP8}) {
    FERRET_EACH y[i] = _mm512_mul_ps(_mm512_add_ps(y[i], _mm512_set1_ps(p)), f[i]);
  }
  FERRET_EACH y[i] = _mm512_mul_ps(y[i], z[i]);
  FERRET_EACH y[i] = _mm512_add_ps(y[i], e_lo[i]);
  FERRET_EACH y[i] = _mm512_add_ps(y[i], _mm512_mul_ps(z[i], _mm512_set1_ps(-0.5f)));
  FERRET_EACH y[i] = _mm512_add_ps(_mm512_add_ps(f[i], y[i]), e_hi[i]);  // log u
  FERRET_EACH radius[i] = _mm512_sqrt_ps(_mm512_mul_ps(y[i], _mm512_set1_ps(-2.0f)));
  // Angle: a in (0, pi/4] from the 21 low bits of n = w >> 9, reflected when y >= 0.5
  // (word bit 29 set); the int -> float conversion is exact.
  __m512 a[N], a2[N], ys[N], yc[N];
  FERRET_EACH {
    const __m512i odd = _mm512_ternarylogic_epi32(_mm512_srli_epi32(wa[i], 8), _mm512_set1_epi32(0x3FFFFF), one,
                                                  0xEA);  // (a & b) | c
    const __m512i picked = _mm512_mask_sub_epi32(odd, _mm512_test_epi32_mask(wa[i], _mm512_set1_epi32(1 << 29)),
                                                 _mm512_set1_epi32(1 << 22), odd);
    a[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(picked), _mm512_set1_ps(kHalfPi * kTwoPowM22));
  }
  FERRET_EACH a2[i] = _mm512_mul_ps(a[i], a[i]);
  FERRET_EACH ys[i] = _mm512_mul_ps(_mm512_set1_ps(kSinP0), a2[i]);
  FERRET_EACH yc[i] = _mm512_mul_ps(_mm512_set1_ps(kCosP0), a2[i]);
  FERRET_EACH ys[i] = _mm512_mul_ps(_mm512_add_ps(ys[i], _mm512_set1_ps(kSinP1)), a2[i]);
  FERRET_EACH yc[i] = _mm512_mul_ps(_mm512_add_ps(yc[i], _mm512_set1_ps(kCosP1)), a2[i]);
  FERRET_EACH ys[i] = _mm512_mul_ps(_mm512_add_ps(ys[i], _mm512_set1_ps(kSinP2)), a2[i]);
  FERRET_EACH yc[i] = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(yc[i], _mm512_set1_ps(kCosP2)), a2[i]), a2[i]);
  FERRET_EACH ys[i] = _mm512_add_ps(_mm512_mul_ps(ys[i], a[i]), a[i]);                       // sin a
  FERRET_EACH yc[i] = _mm512_add_ps(yc[i], _mm512_mul_ps(a2[i], _mm512_set1_ps(-0.5f)));
  FERRET_EACH yc[i] = _mm512_add_ps(yc[i], _mm512_set1_ps(1.0f));                            // cos a
  const __m512i sign = _mm512_set1_epi32(INT32_MIN);
  FERRET_EACH {
    // t bit 31: word bits 31 != 30 (cos negative); bit 30: bits 30 != 29 (cos takes sin a).
    const __m512i t = _mm512_xor_si512(wa[i], _mm512_slli_epi32(wa[i], 1));
    const __mmask16 cos_is_sin = _mm512_test_epi32_mask(t, _mm512_set1_epi32(0x40000000));
    const __m512i cos_mag = _mm512_castps_si512(_mm512_mask_blend_ps(cos_is_sin, yc[i], ys[i]));
    const __m512i sin_mag = _mm512_castps_si512(_mm512_mask_blend_ps(cos_is_sin, ys[i], yc[i]));
    const __m512 cos_v = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(cos_mag, t, sign, 0x78));  // a ^ (b & c)
    const __m512 sin_v = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sin_mag, wa[i], sign, 0x78));
    zc[i] = _mm512_mul_ps(radius[i], cos_v);
    zs[i] = _mm512_mul_ps(radius[i], sin_v);
  }
#undef FERRET_EACH
}

// Groups of 16 calls in flight per step: on Zen 4, one group ran at 1.13 G values/s on
// one core, two at 1.33, three or four no faster (more spills).
constexpr int kGaussGroups = 2;

// G groups of 16 calls: Philox in lockstep, then the 2 G Box-Muller pairs in lockstep;
// the words never leave registers. consume(c, z0, z1, z2, z3) gets calls
// call0 + c .. call0 + c + 15, lane l of z_q holding element q of call call0 + c + l.
template <int G, class Consumer>
FERRET_AVX512 void gaussian_groups(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0, int64_t first,
                                   const __m512 tables[4], Consumer& consume) {
  __m512i w[G][4];
  philox16<G>(key, block, k, call0 + static_cast<uint64_t>(first), w);
  __m512i wr[2 * G], wa[2 * G];
  for (int i = 0; i < G; ++i) {
    wr[2 * i] = w[i][0];
    wa[2 * i] = w[i][1];
    wr[2 * i + 1] = w[i][2];
    wa[2 * i + 1] = w[i][3];
  }
  __m512 zc[2 * G], zs[2 * G];
  box_muller16<2 * G>(wr, wa, tables, zc, zs);
  for (int i = 0; i < G; ++i) consume(first + 16 * i, zc[2 * i], zs[2 * i], zc[2 * i + 1], zs[2 * i + 1]);
}

// Every call of the run, kGaussGroups groups at a time (ncalls is a multiple of 16).
template <class Consumer>
FERRET_AVX512 void gaussian_run(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0, int64_t ncalls,
                                Consumer& consume) {
  const __m512 tables[4] = {_mm512_load_ps(kLogExponent.lo), _mm512_load_ps(kLogExponent.lo + 16),
                            _mm512_load_ps(kLogExponent.hi), _mm512_load_ps(kLogExponent.hi + 16)};
  int64_t c = 0;
  for (; c + 16 * kGaussGroups <= ncalls; c += 16 * kGaussGroups) {
    gaussian_groups<kGaussGroups>(key, block, k, call0, c, tables, consume);
  }
  for (; c < ncalls; c += 16) gaussian_groups<1>(key, block, k, call0, c, tables, consume);
}

// The consumers: the same operations, in the same order per lane, as the portable
// loops below, so every ISA gives the same bits (project's fixed 16 lanes included).
struct StorePlanes {
  float* z;
  int64_t stride;
  FERRET_AVX512 void operator()(int64_t c, __m512 z0, __m512 z1, __m512 z2, __m512 z3) {
    _mm512_storeu_ps(z + c, z0);
    _mm512_storeu_ps(z + stride + c, z1);
    _mm512_storeu_ps(z + 2 * stride + c, z2);
    _mm512_storeu_ps(z + 3 * stride + c, z3);
  }
};

struct DotPlanes {
  const float* x;
  int64_t stride;
  __m512 t;
  FERRET_AVX512 void operator()(int64_t c, __m512 z0, __m512 z1, __m512 z2, __m512 z3) {
    t = _mm512_add_ps(t, _mm512_mul_ps(z0, _mm512_loadu_ps(x + c)));
    t = _mm512_add_ps(t, _mm512_mul_ps(z1, _mm512_loadu_ps(x + stride + c)));
    t = _mm512_add_ps(t, _mm512_mul_ps(z2, _mm512_loadu_ps(x + 2 * stride + c)));
    t = _mm512_add_ps(t, _mm512_mul_ps(z3, _mm512_loadu_ps(x + 3 * stride + c)));
  }
};

struct AccumulatePlanes {
  float* acc;
  int64_t stride;
  __m512 g;
  FERRET_AVX512 void operator()(int64_t c, __m512 z0, __m512 z1, __m512 z2, __m512 z3) {
    const __m512 zq[4] = {z0, z1, z2, z3};
    for (int q = 0; q < 4; ++q) {
      float* a = acc + q * stride + c;
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_mul_ps(g, zq[q])));
    }
  }
};

struct SumValues {
  __m512 t;
  FERRET_AVX512 void operator()(int64_t, __m512 z0, __m512 z1, __m512 z2, __m512 z3) {
    t = _mm512_add_ps(t, _mm512_add_ps(_mm512_add_ps(z0, z1), _mm512_add_ps(z2, z3)));
  }
};

__attribute__((target("avx512f"))) void gaussian_planes(const PhiloxKey& key, uint32_t block, uint32_t k,
                                                        uint64_t call0, int64_t ncalls, float* __restrict z) {
  StorePlanes store{z, ncalls};
  gaussian_run(key, block, k, call0, ncalls, store);
}
#endif

// ---------------------------------------------------------------------------------
// Hot kernels. Rademacher (and the dtype loops): Philox words for a tile, then plain
// loops over lanes that GCC vectorises in each target_clones variant. Gaussian: the
// portable loops here, or the fused AVX-512 path above.

// lane_acc[i*16 + l] += sum over groups g of v_{k_first+i} . x for call call0 + 16g + l,
// x given as 4 planes (element 4c + q in plane q) of ncalls (a multiple of 16, <= 256).
FERRET_INLINE void project_gaussian_portable(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc,
                                             uint64_t call0, int64_t ncalls, const float* __restrict xp,
                                             float* __restrict lane_acc) {
  alignas(64) float z[4 * kGaussCalls];
  const float* __restrict x0 = xp;
  const float* __restrict x1 = xp + ncalls;
  const float* __restrict x2 = xp + 2 * ncalls;
  const float* __restrict x3 = xp + 3 * ncalls;
  const float* __restrict z0 = z;
  const float* __restrict z1 = z + ncalls;
  const float* __restrict z2 = z + 2 * ncalls;
  const float* __restrict z3 = z + 3 * ncalls;
  for (int64_t i = 0; i < kc; ++i) {
    gaussian_planes(key, block, k_first + static_cast<uint32_t>(i), call0, ncalls, z);
    float t[kLanes] = {};
    for (int64_t g = 0; g < ncalls; g += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t c = g + l;
        float s = t[l];
        s = s + z0[c] * x0[c];
        s = s + z1[c] * x1[c];
        s = s + z2[c] * x2[c];
        s = s + z3[c] * x3[c];
        t[l] = s;
      }
    }
    float* a = lane_acc + i * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) a[l] = a[l] + t[l];
  }
}

// lane_acc[i*32 + b] += sum over elements 32m + b of the tile of v_{k_first+i} * x.
// x holds 128 * ncalls elements (ncalls <= 16) starting at element 128 * call0.
FERRET_CLONES void project_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc,
                                      uint64_t call0, int64_t ncalls, const float* __restrict x,
                                      float* __restrict lane_acc) {
  alignas(64) uint32_t w[4 * kRadCalls];
  for (int64_t i = 0; i < kc; ++i) {
    philox_calls(key, block, k_first + static_cast<uint32_t>(i), call0, kRadCalls, w, kRadCalls);
    float t[kBits] = {};
    for (int64_t c = 0; c < ncalls; ++c) {
      for (int q = 0; q < 4; ++q) {
        const uint32_t word = w[q * kRadCalls + c];
        const float* __restrict xx = x + 128 * c + 32 * q;
#pragma omp simd
        for (int64_t b = 0; b < kBits; ++b) t[b] = t[b] + xx[b] * rademacher_value(word, static_cast<uint32_t>(b));
      }
    }
    float* a = lane_acc + i * kBits;
    for (int64_t b = 0; b < kBits; ++b) a[b] = a[b] + t[b];
  }
}

// The reconstruct contract on 4 accumulator planes: for each basis in order,
// acc = acc + coef[i] * v_{k_first+i}, element 4c + q in plane q.
FERRET_INLINE void reconstruct_gaussian_portable(const PhiloxKey& key, uint32_t block, uint32_t k_first,
                                                 int64_t kc, const float* __restrict coef, uint64_t call0,
                                                 int64_t ncalls, float* __restrict accp) {
  alignas(64) float z[4 * kGaussCalls];
  const int64_t n = 4 * ncalls;  // planes are laid out alike, so one flat loop covers all four
  for (int64_t i = 0; i < kc; ++i) {
    gaussian_planes(key, block, k_first + static_cast<uint32_t>(i), call0, ncalls, z);
    const float g = coef[i];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) accp[c] = accp[c] + g * z[c];
  }
}

// The reconstruct contract on 128 * ncalls contiguous accumulators (ncalls <= 16).
FERRET_CLONES void reconstruct_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc,
                                          const float* __restrict coef, uint64_t call0, int64_t ncalls,
                                          float* __restrict acc) {
  alignas(64) uint32_t w[4 * kRadCalls];
  for (int64_t i = 0; i < kc; ++i) {
    philox_calls(key, block, k_first + static_cast<uint32_t>(i), call0, kRadCalls, w, kRadCalls);
    const float g = coef[i];
    for (int64_t c = 0; c < ncalls; ++c) {
      for (int q = 0; q < 4; ++q) {
        const uint32_t word = w[q * kRadCalls + c];
        float* __restrict aa = acc + 128 * c + 32 * q;
#pragma omp simd
        for (int64_t b = 0; b < kBits; ++b) aa[b] = aa[b] + g * rademacher_value(word, static_cast<uint32_t>(b));
      }
    }
  }
}

// Generation-only roofline: the gaussian project loop with no x (sum of the values).
FERRET_INLINE void sum_gaussian_portable(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc,
                                         uint64_t call0, int64_t ncalls, float* __restrict lanes) {
  alignas(64) float z[4 * kGaussCalls];
  const float* __restrict z0 = z;
  const float* __restrict z1 = z + ncalls;
  const float* __restrict z2 = z + 2 * ncalls;
  const float* __restrict z3 = z + 3 * ncalls;
  for (int64_t i = 0; i < kc; ++i) {
    gaussian_planes(key, block, k_first + static_cast<uint32_t>(i), call0, ncalls, z);
    for (int64_t g = 0; g < ncalls; g += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t c = g + l;
        lanes[l] = lanes[l] + ((z0[c] + z1[c]) + (z2[c] + z3[c]));
      }
    }
  }
}

// Generation-only roofline, Rademacher: expand every bit to +-1.0f and sum.
FERRET_CLONES void sum_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc,
                                  uint64_t call0, int64_t ncalls, float* __restrict lanes) {
  alignas(64) uint32_t w[4 * kRadCalls];
  for (int64_t i = 0; i < kc; ++i) {
    philox_calls(key, block, k_first + static_cast<uint32_t>(i), call0, kRadCalls, w, kRadCalls);
    for (int64_t c = 0; c < ncalls; ++c) {
      for (int q = 0; q < 4; ++q) {
        const uint32_t word = w[q * kRadCalls + c];
#pragma omp simd
        for (int64_t b = 0; b < kBits; ++b) lanes[b] = lanes[b] + rademacher_value(word, static_cast<uint32_t>(b));
      }
    }
  }
}

// The gaussian kernels, one version per ISA: the portable loops above for AVX2 and the
// baseline; on AVX-512 the values go from registers straight into the consumer, in the
// same order per lane (see DotPlanes and friends).
#define FERRET_PROJECT_GAUSSIAN_ARGS                                                                 \
  const PhiloxKey &key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0, int64_t ncalls, \
      const float *__restrict xp, float *__restrict lane_acc
#define FERRET_RECONSTRUCT_GAUSSIAN_ARGS                                                              \
  const PhiloxKey &key, uint32_t block, uint32_t k_first, int64_t kc, const float *__restrict coef,    \
      uint64_t call0, int64_t ncalls, float *__restrict accp
#define FERRET_SUM_GAUSSIAN_ARGS \
  const PhiloxKey &key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0, int64_t ncalls, float *__restrict lanes

__attribute__((target("default"))) void project_gaussian_isa(FERRET_PROJECT_GAUSSIAN_ARGS) {
  project_gaussian_portable(key, block, k_first, kc, call0, ncalls, xp, lane_acc);
}
__attribute__((target("default"))) void reconstruct_gaussian_isa(FERRET_RECONSTRUCT_GAUSSIAN_ARGS) {
  reconstruct_gaussian_portable(key, block, k_first, kc, coef, call0, ncalls, accp);
}
__attribute__((target("default"))) void sum_gaussian_isa(FERRET_SUM_GAUSSIAN_ARGS) {
  sum_gaussian_portable(key, block, k_first, kc, call0, ncalls, lanes);
}

#if FERRET_MAX_ISA >= 1
__attribute__((target("avx2"))) void project_gaussian_isa(FERRET_PROJECT_GAUSSIAN_ARGS) {
  project_gaussian_portable(key, block, k_first, kc, call0, ncalls, xp, lane_acc);
}
__attribute__((target("avx2"))) void reconstruct_gaussian_isa(FERRET_RECONSTRUCT_GAUSSIAN_ARGS) {
  reconstruct_gaussian_portable(key, block, k_first, kc, coef, call0, ncalls, accp);
}
__attribute__((target("avx2"))) void sum_gaussian_isa(FERRET_SUM_GAUSSIAN_ARGS) {
  sum_gaussian_portable(key, block, k_first, kc, call0, ncalls, lanes);
}
#endif

#if FERRET_MAX_ISA >= 2
__attribute__((target("avx512f"))) void project_gaussian_isa(FERRET_PROJECT_GAUSSIAN_ARGS) {
  for (int64_t i = 0; i < kc; ++i) {
    DotPlanes dot{xp, ncalls, _mm512_setzero_ps()};
    gaussian_run(key, block, k_first + static_cast<uint32_t>(i), call0, ncalls, dot);
    float* a = lane_acc + i * kLanes;
    _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), dot.t));
  }
}
__attribute__((target("avx512f"))) void reconstruct_gaussian_isa(FERRET_RECONSTRUCT_GAUSSIAN_ARGS) {
  for (int64_t i = 0; i < kc; ++i) {
    AccumulatePlanes acc{accp, ncalls, _mm512_set1_ps(coef[i])};
    gaussian_run(key, block, k_first + static_cast<uint32_t>(i), call0, ncalls, acc);
  }
}
__attribute__((target("avx512f"))) void sum_gaussian_isa(FERRET_SUM_GAUSSIAN_ARGS) {
  SumValues sum{_mm512_loadu_ps(lanes)};
  for (int64_t i = 0; i < kc; ++i) gaussian_run(key, block, k_first + static_cast<uint32_t>(i), call0, ncalls, sum);
  _mm512_storeu_ps(lanes, sum.t);
}
#endif
#undef FERRET_PROJECT_GAUSSIAN_ARGS
#undef FERRET_RECONSTRUCT_GAUSSIAN_ARGS
#undef FERRET_SUM_GAUSSIAN_ARGS

// Basis values of one row: 4 planes of ncalls gaussian calls (ncalls <= 256).
FERRET_CLONES void generate_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0,
                                     int64_t ncalls, float* __restrict planes) {
  gaussian_planes(key, block, k, call0, ncalls, planes);
}

// Basis values of one row: 128 * ncalls Rademacher values (ncalls <= 16).
FERRET_CLONES void generate_rademacher(const PhiloxKey& key, uint32_t block, uint32_t k, uint64_t call0,
                                       int64_t ncalls, float* __restrict out) {
  alignas(64) uint32_t w[4 * kRadCalls];
  philox_calls(key, block, k, call0, kRadCalls, w, kRadCalls);
  for (int64_t c = 0; c < ncalls; ++c) {
    for (int q = 0; q < 4; ++q) {
      const uint32_t word = w[q * kRadCalls + c];
      float* __restrict o = out + 128 * c + 32 * q;
#pragma omp simd
      for (int64_t b = 0; b < kBits; ++b) o[b] = rademacher_value(word, static_cast<uint32_t>(b));
    }
  }
}

// Plane q gets element 4c + q: done once per tile so the per-basis loops need no shuffles.
FERRET_CLONES void deinterleave4(const float* __restrict x, int64_t ncalls, float* __restrict planes) {
  for (int64_t c = 0; c < ncalls; ++c) {
    planes[c] = x[4 * c];
    planes[ncalls + c] = x[4 * c + 1];
    planes[2 * ncalls + c] = x[4 * c + 2];
    planes[3 * ncalls + c] = x[4 * c + 3];
  }
}

FERRET_CLONES void interleave4(const float* __restrict planes, int64_t ncalls, float* __restrict x) {
  for (int64_t c = 0; c < ncalls; ++c) {
    x[4 * c] = planes[c];
    x[4 * c + 1] = planes[ncalls + c];
    x[4 * c + 2] = planes[2 * ncalls + c];
    x[4 * c + 3] = planes[3 * ncalls + c];
  }
}

FERRET_CLONES void load_f32(const void* src, DType dtype, int64_t n, float* __restrict dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      break;
    case DType::kBF16: {
      const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      break;
    }
    case DType::kF16: {
      const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      break;
    }
  }
}

// out = round_to_dtype(float(out) + alpha * acc), the last step of the contract.
FERRET_CLONES void update_out(void* dst, DType dtype, int64_t n, const float* __restrict acc, float alpha) {
  switch (dtype) {
    case DType::kF32: {
      float* __restrict o = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) o[i] = o[i] + alpha * acc[i];
      break;
    }
    case DType::kBF16: {
      uint16_t* __restrict o = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(bf16_to_f32(o[i]) + alpha * acc[i]);
      break;
    }
    case DType::kF16: {
      uint16_t* __restrict o = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) o[i] = f32_to_f16(f16_to_f32(o[i]) + alpha * acc[i]);
      break;
    }
  }
}

// Plain entry points for the multiversioned gaussian kernels: a caller in another
// translation unit cannot see the versions, so it calls these, which dispatch here.
void project_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0,
                      int64_t ncalls, const float* xp, float* lane_acc) {
  project_gaussian_isa(key, block, k_first, kc, call0, ncalls, xp, lane_acc);
}
void reconstruct_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, const float* coef,
                          uint64_t call0, int64_t ncalls, float* accp) {
  reconstruct_gaussian_isa(key, block, k_first, kc, coef, call0, ncalls, accp);
}
void sum_gaussian(const PhiloxKey& key, uint32_t block, uint32_t k_first, int64_t kc, uint64_t call0, int64_t ncalls,
                  float* lanes) {
  sum_gaussian_isa(key, block, k_first, kc, call0, ncalls, lanes);
}

}  // namespace kernels

// Declared in ferret_cpu.h (an op); defined here, next to the ISA versions it reports on.
std::string simd_target() {
  // The same priority order as the target_clones resolver.
  __builtin_cpu_init();
  if (FERRET_MAX_ISA >= 2 && __builtin_cpu_supports("avx512f")) return "avx512f";
  if (FERRET_MAX_ISA >= 1 && __builtin_cpu_supports("avx2")) return "avx2";
  return "default";
}

}  // namespace ferret
