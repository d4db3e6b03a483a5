"""The RNG contract: seeded basis elements as a pure function, in torch.

Element ``j`` of basis ``k`` of block ``b`` under a 64-bit ``seed`` is a float32 that
depends on ``(seed, b, k, j)`` alone. This module is the executable form of
``docs/rng.md`` and the reference every backend (Triton, C++) is tested against bit
for bit. Every float operation below is a single IEEE-754 binary32 ``+``, ``*`` or a
correctly rounded ``sqrt``, in the order written, so any backend that performs the
same operations in the same order without FMA contraction reproduces the same bits.

Integers are carried in int64 tensors holding uint32 values; 32x32-bit products are
split into 16-bit halves so nothing ever overflows int64.
"""

from __future__ import annotations

import torch

CONTRACT_VERSION = 1

DISTRIBUTIONS = ("gaussian", "rademacher")

# Per-element variance rho of each distribution; the unbiased Ferret scale is 1/(rho*K).
# The gaussian is N(0, 1) truncated at |z| <= 5.77 by the 23-bit uniforms (mass lost
# ~8e-9), so its variance is 1 to within 1e-7.
VARIANCE = {"gaussian": 1.0, "rademacher": 1.0}

# Elements produced by one Philox call, which fixes the counter's element grouping.
ELEMENTS_PER_CALL = {"gaussian": 4, "rademacher": 128}

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
MASK16 = 0xFFFF

# float32 constants, written as the exact decimal of their binary32 value so every
# parser lands on the same bits. Polynomials are Cephes' logf / sinf / cosf.
SQRT_HALF = 0.7071067690849304
LN2_HI = 0.693359375  # 355/512: e * LN2_HI is exact for |e| < 2**15
LN2_LO = -0.00021219444170128554
LOG_POLY = (
    0.07037683576345444,
    -0.11514610052108765,
    0.11676998436450958,
    -0.12420140951871872,
    0.14249323308467865,
    -0.16668057441711426,
    0.2000071406364441,
    -0.24999994039535522,
    0.3333333134651184,
)
SIN_POLY = (-0.00019515295571181923, 0.008332161232829094, -0.16666655242443085)
COS_POLY = (2.44331567955669e-05, -0.0013887316454201937, 0.04166664555668831)
HALF_PI = 1.5707963705062866
TWO_POW_M22 = 2.0**-22
TWO_POW_M24 = 2.0**-24


def check_seed(seed) -> int:
    """Return ``seed`` as a Python int after checking it is a uint64 value."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import numpy as np

            if isinstance(seed, np.integer):
                seed = int(seed)
        except ImportError:  # pragma: no cover - numpy ships with torch
            pass
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int in [0, 2**64); got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64); got {seed}. Reduce it with `seed % 2**64`.")
    return seed


def _mul_hi_lo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``m * x`` for a uint32 constant and uint32 tensor."""
    m_hi, m_lo = m >> 16, m & MASK16
    p_lo = x * m_lo
    t = x * m_hi + (p_lo >> 16)
    hi = t >> 16
    lo = ((t & MASK16) << 16) | (p_lo & MASK16)
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds (Random123), on int64 tensors holding uint32 values.

    Counter words ``c0..c3`` and key words ``k0, k1`` broadcast against each other.
    Returns the four output words, int64 tensors in [0, 2**32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mul_hi_lo(PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def unit_uniform(word: torch.Tensor) -> torch.Tensor:
    """(2n+1) * 2**-24 for the top 23 bits n of ``word``: exact, in [2**-24, 1 - 2**-24]."""
    n = word >> 9
    return (2 * n + 1).to(torch.float32) * TWO_POW_M24


def log_unit(u: torch.Tensor) -> torch.Tensor:
    """Natural log of float32 ``u`` in (0, 1), from + and * only (Cephes logf)."""
    bits = u.view(torch.int32).to(torch.int64)
    e = ((bits >> 23) & 0xFF) - 126
    m = ((bits & 0x7FFFFF) | (126 << 23)).to(torch.int32).view(torch.float32)
    small = m < SQRT_HALF
    e = torch.where(small, e - 1, e).to(torch.float32)
    f = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    y = _f32(LOG_POLY[0]) * f
    for c in LOG_POLY[1:]:
        y = (y + c) * f
    y = y * z
    y = y + e * LN2_LO
    y = y + z * -0.5
    r = f + y
    return r + e * LN2_HI


def _sin_poly(a: torch.Tensor) -> torch.Tensor:
    z = a * a
    y = ((_f32(SIN_POLY[0]) * z + SIN_POLY[1]) * z + SIN_POLY[2]) * z
    return y * a + a


def _cos_poly(a: torch.Tensor) -> torch.Tensor:
    z = a * a
    y = (((_f32(COS_POLY[0]) * z + COS_POLY[1]) * z + COS_POLY[2]) * z) * z
    y = y + z * -0.5
    return y + 1.0


def cos_sin_turn(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2*pi*(2n+1)*2**-24 for the top 23 bits n of ``word``.

    The top two of those bits pick the quadrant; the other 21 give y in (0, 1) inside
    it, and the polynomials only ever see an angle in (0, pi/4].
    """
    n = word >> 9
    quadrant = n >> 21
    y = (2 * (n & 0x1FFFFF) + 1).to(torch.float32) * TWO_POW_M22
    low = y < 0.5
    a = torch.where(low, y, 1.0 - y) * HALF_PI
    s_a, c_a = _sin_poly(a), _cos_poly(a)
    sin_q = torch.where(low, s_a, c_a)
    cos_q = torch.where(low, c_a, s_a)
    cos = torch.where(quadrant == 0, cos_q, torch.where(quadrant == 1, -sin_q, torch.where(quadrant == 2, -cos_q, sin_q)))
    sin = torch.where(quadrant == 0, sin_q, torch.where(quadrant == 1, cos_q, torch.where(quadrant == 2, -sin_q, -cos_q)))
    return cos, sin


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """IEEE sqrt of float32 ``x``, rounded to nearest.

    torch's vectorised float32 sqrt on CPU is not always correctly rounded (seen on
    AVX-512: about 15% of results 1 ulp off), so take it in float64, where sqrt of a
    float32 is then rounded once more to float32 without any double-rounding error.
    """
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def box_muller(w_radius: torch.Tensor, w_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals from two Philox words."""
    r = correctly_rounded_sqrt(log_unit(unit_uniform(w_radius)) * -2.0)
    cos, sin = cos_sin_turn(w_angle)
    return r * cos, r * sin


def round_float32_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x`` rounded to nearest-even in ``dtype``, NaN as the contract says.

    bfloat16 is rounded on the bits (NaN -> 0x7FC0): torch's vectorised cast may keep
    other NaN bits. float16 uses torch's cast (round to nearest even).
    """
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32).to(torch.int64) & MASK32
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = torch.where(torch.isnan(x), 0x7FC0, rounded)
        return rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    return x.to(dtype)


def _split_seed(seed: int) -> tuple[int, int]:
    seed = check_seed(seed)
    return seed & MASK32, seed >> 32


def elements(seed: int, block, k, j, distribution: str = "gaussian") -> torch.Tensor:
    """Basis elements v_{block,k}[j] as float32, broadcasting ``block``, ``k``, ``j``.

    ``block`` and ``k`` are in [0, 2**32), ``j`` in [0, 2**62): int64 tensors or ints.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}")
    key0, key1 = _split_seed(seed)
    block = torch.as_tensor(block, dtype=torch.int64)
    k = torch.as_tensor(k, dtype=torch.int64)
    j = torch.as_tensor(j, dtype=torch.int64)
    per_call = ELEMENTS_PER_CALL[distribution]
    call = j // per_call
    lane = j % per_call
    w = philox4x32_10(call & MASK32, call >> 32, k, block, key0, key1)
    if distribution == "rademacher":
        word = lane >> 5
        picked = torch.where(word == 0, w[0], torch.where(word == 1, w[1], torch.where(word == 2, w[2], w[3])))
        bit = (picked >> (lane & 31)) & 1
        return (1 - 2 * bit).to(torch.float32)
    z0, z1 = box_muller(w[0], w[1])
    z2, z3 = box_muller(w[2], w[3])
    return torch.where(lane == 0, z0, torch.where(lane == 1, z1, torch.where(lane == 2, z2, z3)))


def generate(seed: int, block: int, k_begin: int, k_count: int, j_begin: int, n: int,
             distribution: str = "gaussian") -> torch.Tensor:
    """Rows k_begin..k_begin+k_count-1 of block ``block``, elements j_begin..j_begin+n-1.

    Returns a float32 CPU tensor of shape (k_count, n). Each Philox call is made once
    and its outputs are spread over the elements it covers.
    """
    per_call = ELEMENTS_PER_CALL[distribution] if distribution in DISTRIBUTIONS else 1
    if per_call == 1:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}")
    key0, key1 = _split_seed(seed)
    first_call = j_begin // per_call
    last_call = (j_begin + n - 1) // per_call
    calls = torch.arange(first_call, last_call + 1, dtype=torch.int64)[None, :]
    ks = torch.arange(k_begin, k_begin + k_count, dtype=torch.int64)[:, None]
    w = philox4x32_10(calls & MASK32, calls >> 32, ks, block, key0, key1)
    if distribution == "rademacher":
        words = torch.stack(w, dim=-1)
        bits = (words[..., None] >> torch.arange(32, dtype=torch.int64)) & 1
        values = (1 - 2 * bits).to(torch.float32)
    else:
        z0, z1 = box_muller(w[0], w[1])
        z2, z3 = box_muller(w[2], w[3])
        values = torch.stack((z0, z1, z2, z3), dim=-1)
    values = values.reshape(k_count, -1)
    start = j_begin - first_call * per_call
    return values[:, start:start + n]
