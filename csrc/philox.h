// The RNG contract of ferret_kernels/rng.py (docs/rng.md) as scalar C++ for one lane.
//
// Everything here is always_inline and branch-free so that GCC vectorises it across
// lanes when it is called inside a `#pragma omp simd` loop over Philox calls (one lane
// per call); the kernels in ferret_cpu.cpp are written that way. Every float operation
// is the single binary32 +, * or correctly rounded sqrt of rng.py, in the same order:
// the extension is built with -ffp-contract=off and without -ffast-math, so the bits
// match the torch reference exactly. Selects and sign flips are exact, so they are
// done on bits where that is cheaper than the nested torch.where of the reference.
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

FERRET_INLINE uint32_t f32_bits(float x) { return __builtin_bit_cast(uint32_t, x); }
FERRET_INLINE float bits_f32(uint32_t x) { return __builtin_bit_cast(float, x); }

// Philox4x32-10 (Random123). The 32x32->64 products are what the vectoriser turns into
// even/odd vpmuludq pairs; the rounds are spelled out so no inner loop blocks it.
FERRET_INLINE void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, const uint32_t* k0,
                                  const uint32_t* k1, uint32_t& o0, uint32_t& o1, uint32_t& o2, uint32_t& o3) {
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
  o0 = c0;
  o1 = c1;
  o2 = c2;
  o3 = c3;
}

// rng.unit_uniform: (2n+1) * 2**-24 is exact (2n+1 < 2**24), so int->float is exact too.
FERRET_INLINE float unit_uniform(uint32_t word) {
  const int32_t odd = static_cast<int32_t>(((word >> 9) << 1) | 1u);
  return static_cast<float>(odd) * kTwoPowM24;
}

// rng.log_unit (Cephes logf on (0, 1)).
FERRET_INLINE float log_unit(float u) {
  const uint32_t bits = f32_bits(u);
  const int32_t e_raw = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126;
  const float m = bits_f32((bits & 0x7FFFFFu) | (126u << 23));
  const bool small = m < kSqrtHalf;
  const float e = static_cast<float>(small ? e_raw - 1 : e_raw);
  const float f_small = (m + m) - 1.0f;
  const float f_big = m - 1.0f;
  const float f = small ? f_small : f_big;
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

// rng.cos_sin_turn. The reference picks cos/sin per quadrant with nested wheres;
// here the same value is chosen by one select (odd quadrants swap sin and cos, as does
// the reflection y -> 1 - y) and the sign is applied as a sign-bit flip, which is
// exactly the reference's negation.
FERRET_INLINE void cos_sin_turn(uint32_t word, float& cos_out, float& sin_out) {
  const uint32_t n = word >> 9;
  const uint32_t quadrant = n >> 21;
  const int32_t odd = static_cast<int32_t>(((n & 0x1FFFFFu) << 1) | 1u);
  const float y = static_cast<float>(odd) * kTwoPowM22;
  const bool low = y < 0.5f;
  const float reflected = 1.0f - y;
  const float a = (low ? y : reflected) * kHalfPi;
  const float s_a = sin_poly(a);
  const float c_a = cos_poly(a);
  const bool swap = low != ((quadrant & 1u) != 0);  // true: cos takes c_a
  const float cos_mag = swap ? c_a : s_a;
  const float sin_mag = swap ? s_a : c_a;
  const uint32_t cos_sign = ((quadrant + 1u) & 2u) << 30;  // quadrants 1, 2
  const uint32_t sin_sign = (quadrant & 2u) << 30;         // quadrants 2, 3
  cos_out = bits_f32(f32_bits(cos_mag) ^ cos_sign);
  sin_out = bits_f32(f32_bits(sin_mag) ^ sin_sign);
}

// rng.box_muller. __builtin_sqrtf is the correctly rounded IEEE sqrt (sqrtss/vsqrtps);
// -fno-math-errno lets it vectorise (its argument is always > 0 here).
FERRET_INLINE void box_muller(uint32_t w_radius, uint32_t w_angle, float& z_cos, float& z_sin) {
  const float r = __builtin_sqrtf(log_unit(unit_uniform(w_radius)) * -2.0f);
  float c, s;
  cos_sin_turn(w_angle, c, s);
  z_cos = r * c;
  z_sin = r * s;
}

// Counter words of Philox call `call_lo + lane` (64-bit, split): lanes add to the low
// word and carry into the high word, so a group may straddle a 2**32 boundary.
FERRET_INLINE void call_words(uint32_t base_lo, uint32_t base_hi, uint32_t lane, uint32_t& lo, uint32_t& hi) {
  lo = base_lo + lane;
  hi = base_hi + (lo < base_lo ? 1u : 0u);
}

// Elements 4*call + 0..3 of basis (block, k): four normals.
FERRET_INLINE void gaussian4(uint32_t call_lo, uint32_t call_hi, uint32_t k, uint32_t block, const PhiloxKey& key,
                             float& z0, float& z1, float& z2, float& z3) {
  uint32_t w0, w1, w2, w3;
  philox4x32_10(call_lo, call_hi, k, block, key.k0, key.k1, w0, w1, w2, w3);
  box_muller(w0, w1, z0, z1);
  box_muller(w2, w3, z2, z3);
}

// The four words behind elements 128*call + 0..127 of basis (block, k); element
// 32*q + b is -1 when bit b of word q is set.
FERRET_INLINE void rademacher_words(uint32_t call_lo, uint32_t call_hi, uint32_t k, uint32_t block,
                                    const PhiloxKey& key, uint32_t& w0, uint32_t& w1, uint32_t& w2, uint32_t& w3) {
  philox4x32_10(call_lo, call_hi, k, block, key.k0, key.k1, w0, w1, w2, w3);
}

// +1.0f / -1.0f for bit b of word: the value the reference multiplies by.
FERRET_INLINE float rademacher_value(uint32_t word, uint32_t b) {
  return bits_f32(0x3F800000u | (((word >> b) & 1u) << 31));
}

}  // namespace ferret
