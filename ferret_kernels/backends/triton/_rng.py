"""The RNG contract (docs/rng.md) as Triton device functions.

Each helper mirrors the function of the same name in ``ferret_kernels.rng`` operation
for operation; kernels that call them launch through ``_launch.run`` (fusion off) so no
multiply-add is contracted into an FMA and the bits match the torch reference.
"""

import triton
import triton.language as tl

from ... import rng

PHILOX_M0 = tl.constexpr(rng.PHILOX_M0)
PHILOX_M1 = tl.constexpr(rng.PHILOX_M1)
PHILOX_W0 = tl.constexpr(rng.PHILOX_W0)
PHILOX_W1 = tl.constexpr(rng.PHILOX_W1)

SQRT_HALF = tl.constexpr(rng.SQRT_HALF)
LN2_HI = tl.constexpr(rng.LN2_HI)
LN2_LO = tl.constexpr(rng.LN2_LO)
LOG_P0 = tl.constexpr(rng.LOG_POLY[0])
LOG_P1 = tl.constexpr(rng.LOG_POLY[1])
LOG_P2 = tl.constexpr(rng.LOG_POLY[2])
LOG_P3 = tl.constexpr(rng.LOG_POLY[3])
LOG_P4 = tl.constexpr(rng.LOG_POLY[4])
LOG_P5 = tl.constexpr(rng.LOG_POLY[5])
LOG_P6 = tl.constexpr(rng.LOG_POLY[6])
LOG_P7 = tl.constexpr(rng.LOG_POLY[7])
LOG_P8 = tl.constexpr(rng.LOG_POLY[8])
SIN_P0 = tl.constexpr(rng.SIN_POLY[0])
SIN_P1 = tl.constexpr(rng.SIN_POLY[1])
SIN_P2 = tl.constexpr(rng.SIN_POLY[2])
COS_P0 = tl.constexpr(rng.COS_POLY[0])
COS_P1 = tl.constexpr(rng.COS_POLY[1])
COS_P2 = tl.constexpr(rng.COS_POLY[2])
HALF_PI = tl.constexpr(rng.HALF_PI)
TWO_POW_M22 = tl.constexpr(rng.TWO_POW_M22)
TWO_POW_M24 = tl.constexpr(rng.TWO_POW_M24)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 words; key bumped before rounds 2..10."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def unit_uniform(word):
    n = word >> 9
    return (2 * n + 1).to(tl.float32) * TWO_POW_M24


@triton.jit
def log_unit(u):
    bits = u.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 126
    m = ((bits & 0x7FFFFF) | (126 << 23)).to(tl.float32, bitcast=True)
    small = m < SQRT_HALF
    e = tl.where(small, e - 1, e).to(tl.float32)
    f = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    y = LOG_P0 * f
    y = (y + LOG_P1) * f
    y = (y + LOG_P2) * f
    y = (y + LOG_P3) * f
    y = (y + LOG_P4) * f
    y = (y + LOG_P5) * f
    y = (y + LOG_P6) * f
    y = (y + LOG_P7) * f
    y = (y + LOG_P8) * f
    y = y * z
    y = y + e * LN2_LO
    y = y + z * -0.5
    r = f + y
    return r + e * LN2_HI


@triton.jit
def _sin_poly(a):
    z = a * a
    y = ((SIN_P0 * z + SIN_P1) * z + SIN_P2) * z
    return y * a + a


@triton.jit
def _cos_poly(a):
    z = a * a
    y = (((COS_P0 * z + COS_P1) * z + COS_P2) * z) * z
    y = y + z * -0.5
    return y + 1.0


@triton.jit
def cos_sin_turn(word):
    n = word >> 9
    quadrant = n >> 21
    y = (2 * (n & 0x1FFFFF) + 1).to(tl.float32) * TWO_POW_M22
    low = y < 0.5
    a = tl.where(low, y, 1.0 - y) * HALF_PI
    s_a = _sin_poly(a)
    c_a = _cos_poly(a)
    sin_q = tl.where(low, s_a, c_a)
    cos_q = tl.where(low, c_a, s_a)
    cos = tl.where(quadrant == 0, cos_q, tl.where(quadrant == 1, -sin_q, tl.where(quadrant == 2, -cos_q, sin_q)))
    sin = tl.where(quadrant == 0, sin_q, tl.where(quadrant == 1, cos_q, tl.where(quadrant == 2, -sin_q, -cos_q)))
    return cos, sin


@triton.jit
def box_muller(w_radius, w_angle):
    r = tl.sqrt_rn(log_unit(unit_uniform(w_radius)) * -2.0)
    cos, sin = cos_sin_turn(w_angle)
    return r * cos, r * sin


@triton.jit
def gaussian4(call, k, block, seed_lo, seed_hi):
    """Elements 4*call + 0..3 of basis (block, k): four float32 normals.

    ``call`` is an int64 tensor of Philox call indices; ``k``, ``block``, ``seed_lo``,
    ``seed_hi`` are uint32 scalars.
    """
    c0 = (call & 0xFFFFFFFF).to(tl.uint32)
    c1 = (call >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + k
    c3 = tl.zeros_like(c0) + block
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def uint32_key(words_ptr):
    """The Philox key (seed mod 2**32, seed >> 32) stored as two int64 words.

    Seeds always come from memory, never as kernel arguments: Triton would type an
    integer argument i32 or i64 by its value and compile again when a seed crosses 2**31.
    """
    return tl.load(words_ptr).to(tl.uint32), tl.load(words_ptr + 1).to(tl.uint32)


@triton.jit
def rademacher_words(call, k, block, seed_lo, seed_hi):
    """The four Philox words behind elements 128*call + 0..127 (bit set = -1)."""
    c0 = (call & 0xFFFFFFFF).to(tl.uint32)
    c1 = (call >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + k
    c3 = tl.zeros_like(c0) + block
    return philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)


@triton.jit
def hand_over(word):
    """``word`` unchanged (word + 0), behind a reduction the compiler does not recompute
    in another layout: a consumer laid out differently (project's x tile) then receives
    the words by shuffles instead of every lane re-running the Philox calls it needs."""
    return tl.sum(tl.join(word, tl.zeros_like(word)), axis=1)


@triton.jit
def signed_by_bit(x, word, bit):
    """x where bit ``bit`` of ``word`` is clear, -x where it is set: x * v exactly.

    ``word`` holds one Philox word per call, ``bit`` the 32 bit positions; ``x`` is a
    scalar or a (32, calls) tile. Bits run down the rows and calls along the columns:
    with calls on the fast axis each lane keeps its own call's word, so Triton computes
    one Philox call per lane (with bits on the fast axis, Triton 3.6 repeats a row's
    Philox call in every lane of the row)."""
    flip = ((word[None, :] >> bit[:, None]) & 1) != 0
    return tl.where(flip, -x, x)


@triton.jit
def signed_by_lane_bit(x, word, bit, CALLS_FIRST: tl.constexpr):
    """x where bit ``bit`` of ``word`` is clear, -x where it is set, for an x tile of
    ``_tile.lane_tile`` ((8, 4, calls), or (calls, 4, 8) when CALLS_FIRST): ``word`` holds
    one Philox word per call, ``bit`` the bit positions 4q + r in x's shape with the calls'
    axis of size 1. Each lane computes the Philox call of its own elements."""
    if CALLS_FIRST:
        flip = ((word[:, None, None] >> bit) & 1) != 0
    else:
        flip = ((word[None, None, :] >> bit) & 1) != 0
    return tl.where(flip, -x, x)


@triton.jit
def round_float32_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in ``DTYPE``, the same on GPU and interpreter.

    Triton's interpreter truncates float32 -> bfloat16, so that case is done on the bits.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE)
