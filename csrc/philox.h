// The RNG contract of ferret_kernels/rng.py (docs/rng.md) as scalar C++ for one lane.
//
// Everything here is always_inline and branch-free so that GCC vectorises it across
// lanes when it is called inside a `#pragma omp simd` loop over Philox calls (one lane
// per call); the kernels in ferret_cpu.cpp are written that way. (The scalar Philox
// here is the baseline path and the spec for the hand-vectorised AVX2 / AVX-512
// versions there; GCC 12 vectorises its 32x32->64 products poorly.) Every float
// operation is the single binary32 +, * or correctly rounded sqrt of rng.py, in the
// same order: the extension is built with -ffp-contract=off and without -ffast-math,
// so the bits match the torch reference exactly. Integer-side steps (selects, sign
// flips, exponent splits) may be rearranged wherever the result is provably the same
// bits; each such place says why.
#pragma once

#include <cstdint>

#define FERRET_INLINE inline __attribute__((always_inline))

namespace ferret {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Hex literals: the exact binary32 values of the decimal constants in rng.py.
constexpr float kSqrtHalf = 0x1.6a09e6p-1f;
constexpr float kLn2Hi = 0x1.63p-1f;
constexpr float kLn2Lo = -0x1.bd0106p-13f;
constexpr float kLogP0 = 0x1.204376p-4f;
constexpr float kLogP1 = -0x1.d7a370p-4f;
constexpr float kLogP2 = 0x1.de4a34p-4f;
constexpr float kLogP3 = -0x1.fcba9ep-4f;
constexpr float kLogP4 = 0x1.23d37ep-3f;
constexpr float kLogP5 = -0x1.555ca0p-3f;
constexpr float kLogP6 = 0x1.999d58p-3f;
constexpr float kLogP7 = -0x1.fffff8p-3f;
constexpr float kLogP8 = 0x1.555554p-2f;
constexpr float kSinP0 = -0x1.9943f2p-13f;
constexpr float kSinP1 = 0x1.11073cp-7f;
constexpr float kSinP2 = -0x1.555546p-3f;
constexpr float kCosP0 = 0x1.99eb9cp-16f;
constexpr float kCosP1 = -0x1.6c0c34p-10f;
constexpr float kCosP2 = 0x1.55554ap-5f;
constexpr float kHalfPi = 0x1.921fb6p+0f;
constexpr float kTwoPowM22 = 0x1p-22f;
constexpr float kTwoPowM24 = 0x1p-24f;

// The ten round keys, computed once per seed: inside a lane loop they are then
// broadcast constants instead of two adds per round per lane.
struct PhiloxKey {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];

  explicit PhiloxKey(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
  }
};

// Results are returned by value, never through reference parameters: OpenMP lowers a
// simd loop before inlining, and an address-taken local in its body becomes a per-lane
// array the vectoriser cannot handle.
struct Words4 {
  uint32_t w0, w1, w2, w3;
};
struct Float2 {
  float a, b;
};
struct Float4 {
  float z0, z1, z2, z3;
};
struct Call {
  uint32_t lo, hi;
};

FERRET_INLINE uint32_t f32_bits(float x) { return __builtin_bit_cast(uint32_t, x); }
FERRET_INLINE float bits_f32(uint32_t x) { return __builtin_bit_cast(float, x); }

// Philox4x32-10 (Random123). The 32x32->64 products are what the vectoriser turns into
// even/odd vpmuludq pairs; the rounds are spelled out so no inner loop blocks it.
FERRET_INLINE Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, const uint32_t* k0,
                                    const uint32_t* k1) {
#define FERRET_PHILOX_ROUND(r)                                                  \
  {                                                                             \
    const uint64_t p0 = static_cast<uint64_t>(c0) * kPhiloxM0;                  \
    const uint64_t p1 = static_cast<uint64_t>(c2) * kPhiloxM1;                  \
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0[r];           \
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1[r];           \
    c1 = static_cast<uint32_t>(p1);                                             \
    c3 = static_cast<uint32_t>(p0);                                             \
    c0 = n0;                                                                    \
    c2 = n2;                                                                    \
  }
  FERRET_PHILOX_ROUND(0)
  FERRET_PHILOX_ROUND(1)
  FERRET_PHILOX_ROUND(2)
  FERRET_PHILOX_ROUND(3)
  FERRET_PHILOX_ROUND(4)
  FERRET_PHILOX_ROUND(5)
  FERRET_PHILOX_ROUND(6)
  FERRET_PHILOX_ROUND(7)
  FERRET_PHILOX_ROUND(8)
  FERRET_PHILOX_ROUND(9)
#undef FERRET_PHILOX_ROUND
  return Words4{c0, c1, c2, c3};
}

// rng.unit_uniform: (2n+1) * 2**-24 for n = word >> 9. (word >> 8) | 1 is 2n+1 (the |1
// overwrites bit 8), and 2n+1 < 2**24, so the int->float conversion is exact too.
FERRET_INLINE float unit_uniform(uint32_t word) {
  const int32_t odd = static_cast<int32_t>((word >> 8) | 1u);
  return static_cast<float>(odd) * kTwoPowM24;
}

// rng.log_unit (Cephes logf on (0, 1)). The reference writes u = m * 2**e with m in
// [0.5, 1), and when m < SQRT_HALF uses e - 1 and f = (m + m) - 1 instead: that is,
// u = M * 2**e' with M in [SQRT_HALF, 2 * SQRT_HALF) and f = M - 1 (m + m is exact).
// e' and M come out of one integer add (musl's logf does the same): adding
// 1.0f - SQRT_HALF to the bits carries into the exponent exactly when m >= SQRT_HALF.
// Besides saving integer work, it keeps float ops out of selects: GCC sinks those into
// branches that -ftrapping-math then refuses to if-convert, and nothing vectorises.
FERRET_INLINE float log_unit(float u) {
  constexpr uint32_t kSqrtHalfBits = 0x3F3504F3u;
  static_assert(__builtin_bit_cast(uint32_t, kSqrtHalf) == kSqrtHalfBits, "SQRT_HALF bits");
  const uint32_t ix = f32_bits(u) + (0x3F800000u - kSqrtHalfBits);
  const float e = static_cast<float>(static_cast<int32_t>(ix >> 23) - 127);
  const float f = bits_f32((ix & 0x7FFFFFu) + kSqrtHalfBits) - 1.0f;
  const float z = f * f;
  float y = kLogP0 * f;
  y = (y + kLogP1) * f;
  y = (y + kLogP2) * f;
  y = (y + kLogP3) * f;
  y = (y + kLogP4) * f;
  y = (y + kLogP5) * f;
  y = (y + kLogP6) * f;
  y = (y + kLogP7) * f;
  y = (y + kLogP8) * f;
  y = y * z;
  y = y + e * kLn2Lo;
  y = y + z * -0.5f;
  const float r = f + y;
  return r + e * kLn2Hi;
}

FERRET_INLINE float sin_poly(float a) {
  const float z = a * a;
  const float y = ((kSinP0 * z + kSinP1) * z + kSinP2) * z;
  return y * a + a;
}

FERRET_INLINE float cos_poly(float a) {
  const float z = a * a;
  float y = (((kCosP0 * z + kCosP1) * z + kCosP2) * z) * z;
  y = y + z * -0.5f;
  return y + 1.0f;
}

// rng.cos_sin_turn, for n = word >> 9: quadrant = n >> 21 (word bits 31, 30), and
// y = odd * 2**-22 with odd = 2 * (n & 0x1FFFFF) + 1.
//  * where(y < 0.5, y, 1 - y): both are exact (1 - y = (2**22 - odd) * 2**-22), so the
//    pick is made on the integers; y < 0.5 <=> odd < 2**21.
//  * The nested wheres over quadrants reduce to: cos takes c_a when `y < 0.5` equals
//    "even quadrant", i.e. when word bits 29 and 30 are equal, else s_a (sin the other);
//    cos is negated in quadrants 1, 2 (bits 31 != 30) and sin in 2, 3 (bit 31). The
//    negations are sign-bit flips, exactly the reference's unary minus.
// Everything but the polynomials stays in uint32 so the select masks come from integer
// compares (a bool built from the quadrant stops GCC vectorising).
FERRET_INLINE Float2 cos_sin_turn(uint32_t word) {
  const int32_t odd = static_cast<int32_t>(((word >> 8) & 0x3FFFFFu) | 1u);
  const int32_t picked = odd < (1 << 21) ? odd : (1 << 22) - odd;
  const float a = (static_cast<float>(picked) * kTwoPowM22) * kHalfPi;
  const float s_a = sin_poly(a);
  const float c_a = cos_poly(a);
  const uint32_t t = word ^ (word << 1);  // bit 31: bits 31 != 30; bit 30: bits 30 != 29
  const bool cos_is_sin = (t & 0x40000000u) != 0u;
  const float cos_mag = cos_is_sin ? s_a : c_a;
  const float sin_mag = cos_is_sin ? c_a : s_a;
  return Float2{bits_f32(f32_bits(cos_mag) ^ (t & 0x80000000u)), bits_f32(f32_bits(sin_mag) ^ (word & 0x80000000u))};
}

// rng.box_muller. __builtin_sqrtf is the correctly rounded IEEE sqrt (sqrtss/vsqrtps);
// -fno-math-errno lets it vectorise (its argument is always > 0 here).
FERRET_INLINE Float2 box_muller(uint32_t w_radius, uint32_t w_angle) {
  const float r = __builtin_sqrtf(log_unit(unit_uniform(w_radius)) * -2.0f);
  const Float2 cs = cos_sin_turn(w_angle);
  return Float2{r * cs.a, r * cs.b};
}

// Counter words of Philox call `call_lo + lane` (64-bit, split): lanes add to the low
// word and carry into the high word, so a group may straddle a 2**32 boundary.
FERRET_INLINE Call call_words(uint32_t base_lo, uint32_t base_hi, uint32_t lane) {
  const uint32_t lo = base_lo + lane;
  return Call{lo, base_hi + (lo < base_lo ? 1u : 0u)};
}

// Elements 4*call + 0..3 of a gaussian basis from the call's four Philox words.
FERRET_INLINE Float4 gaussian4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  const Float2 a = box_muller(w0, w1);
  const Float2 b = box_muller(w2, w3);
  return Float4{a.a, a.b, b.a, b.b};
}

// The words of Philox call `call` of basis (block, k): counter (call lo, call hi, k, block).
// For Rademacher, element 128*call + 32*q + b is -1 when bit b of word q is set.
FERRET_INLINE Words4 philox_call(Call call, uint32_t k, uint32_t block, const PhiloxKey& key) {
  return philox4x32_10(call.lo, call.hi, k, block, key.k0, key.k1);
}

// +1.0f / -1.0f for bit b of word: the value the reference multiplies by.
FERRET_INLINE float rademacher_value(uint32_t word, uint32_t b) {
  return bits_f32(0x3F800000u | (((word >> b) & 1u) << 31));
}

}  // namespace ferret
