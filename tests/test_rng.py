"""The RNG contract (docs/rng.md): Philox known answers, golden values, float-stage
accuracy against float64, and the distributions' statistics."""

import math

import pytest
import torch
from helpers import assert_bitwise, bits, dense_basis

from ferret_kernels import rng

# Random123's tests/kat_vectors, philox4x32 10: counter, key, expected output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# Contract version 1: (distribution, seed, block, k, first j, float32 bits of 8 elements).
GOLDEN = [
    ("gaussian", 0x0, 0, 0, 0,
     (0x3F7DBB2F, 0xBF6CB6B3, 0xBF1E1BA1, 0xBEF6D1A9, 0xBE1D5354, 0x3E392A67, 0x3F54EC98, 0x3E4A2D9A)),
    ("gaussian", 0xFFFFFFFFFFFFFFFF, 2**32 - 1, 2**32 - 1, 2**40 - 2,
     (0x3F8C4EA6, 0xBE4E4DA2, 0x3EA76742, 0xBE20A66B, 0x3FA7EDCE, 0x3E2E7F66, 0xBF1EADCF, 0xBF84A972)),
    ("gaussian", 0x0123456789ABCDEF, 193, 7799, 2**32 - 3,
     (0xBE441989, 0x3F63CC60, 0xBD76D691, 0xBEA5D8F9, 0x3E75177C, 0x3E17F453, 0x3F26EE4B, 0x3E6121D8)),
    ("rademacher", 42, 3, 5, 0,
     (0xBF800000, 0x3F800000, 0xBF800000, 0xBF800000, 0x3F800000, 0x3F800000, 0xBF800000, 0x3F800000)),
    ("rademacher", 42, 3, 5, 2**40 + 124,
     (0x3F800000, 0x3F800000, 0xBF800000, 0x3F800000, 0x3F800000, 0xBF800000, 0x3F800000, 0xBF800000)),
]


def bit_list(t: torch.Tensor) -> list[int]:
    return [b & 0xFFFFFFFF for b in bits(t).tolist()]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = rng.philox4x32_10(*counter, *key)
    assert tuple(int(w) for w in out) == expected


def test_philox_vectorised_matches_scalar():
    c = torch.randint(0, 2**32, (4, 257), dtype=torch.int64)
    k = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    batch = rng.philox4x32_10(c[0], c[1], c[2], c[3], int(k[0]), int(k[1]))
    for i in (0, 100, 256):
        single = rng.philox4x32_10(*(int(c[w, i]) for w in range(4)), int(k[0]), int(k[1]))
        assert [int(b[i]) for b in batch] == [int(s) for s in single]


@pytest.mark.parametrize("dist,seed,block,k,j,expected", GOLDEN)
def test_golden_values(dist, seed, block, k, j, expected):
    v = rng.elements(seed, block, k, torch.arange(j, j + 8), dist)
    assert bit_list(v) == list(expected)
    chunk = rng.generate(seed, block, k, 1, j, 8, dist)
    assert bit_list(chunk[0]) == list(expected)


def test_golden_gaussian_is_box_muller_of_the_known_answer_words():
    """Elements 0..3 of (seed 0, block 0, k 0) come from Philox(counter 0, key 0)."""
    w = PHILOX_KAT[0][2]
    u1 = (2 * (w[0] >> 9) + 1) * 2.0**-24
    t1 = 2 * math.pi * (2 * (w[1] >> 9) + 1) * 2.0**-24
    u2 = (2 * (w[2] >> 9) + 1) * 2.0**-24
    t2 = 2 * math.pi * (2 * (w[3] >> 9) + 1) * 2.0**-24
    r1, r2 = math.sqrt(-2 * math.log(u1)), math.sqrt(-2 * math.log(u2))
    exact = [r1 * math.cos(t1), r1 * math.sin(t1), r2 * math.cos(t2), r2 * math.sin(t2)]
    got = rng.elements(0, 0, 0, torch.arange(4)).tolist()
    assert got == pytest.approx(exact, rel=1e-6, abs=1e-6)


def test_rademacher_bit_order():
    """Element j is -1 exactly when bit j % 32 of word (j % 128) // 32 is set."""
    words = rng.philox4x32_10(7, 0, 2, 1, 9, 0)
    j = torch.arange(7 * 128, 8 * 128)
    v = rng.elements(9, 1, 2, j, "rademacher")
    for jj, value in zip(j.tolist(), v.tolist(), strict=True):
        bit = (int(words[(jj % 128) // 32]) >> (jj % 32)) & 1
        assert value == (-1.0 if bit else 1.0)


def test_log_is_within_one_ulp_over_every_uniform():
    n = torch.arange(2**23, dtype=torch.int64)
    u = rng.unit_uniform(n << 9)
    assert float(u.min()) == 2.0**-24 and float(u.max()) == 1 - 2.0**-24
    got = rng.log_unit(u)
    exact = torch.log(u.double())
    ulp = (torch.nextafter(got, torch.tensor(math.inf)) - got).double()
    assert float(((got.double() - exact).abs() / ulp).max()) <= 1.1


def test_cos_sin_over_every_angle():
    n = torch.arange(2**23, dtype=torch.int64)
    cos, sin = rng.cos_sin_turn(n << 9)
    theta = 2 * math.pi * (2 * n + 1).double() * 2.0**-24
    assert float((cos.double() - torch.cos(theta)).abs().max()) < 1.2e-7
    assert float((sin.double() - torch.sin(theta)).abs().max()) < 1.2e-7


def test_correctly_rounded_sqrt():
    x = torch.rand(1 << 16) * 40
    got = rng.correctly_rounded_sqrt(x).double()
    exact = torch.sqrt(x.double())
    below = torch.nextafter(got.float(), torch.tensor(0.0)).double()
    above = torch.nextafter(got.float(), torch.tensor(math.inf)).double()
    assert bool(((exact - got).abs() <= (exact - below).abs()).all())
    assert bool(((exact - got).abs() <= (exact - above).abs()).all())


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_gaussian_moments_and_ks():
    n = 1 << 20
    z = rng.generate(2024, 5, 0, 4, 0, n // 4).reshape(-1).double()
    m = z.mean()
    var = z.var()
    skew = ((z - m) ** 3).mean() / var**1.5
    kurt = ((z - m) ** 4).mean() / var**2
    # 5-sigma bounds from the sampling standard errors of each moment.
    assert abs(float(m)) < 5 / math.sqrt(n)
    assert abs(float(var) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(skew)) < 5 * math.sqrt(6 / n)
    assert abs(float(kurt) - 3) < 5 * math.sqrt(24 / n)
    zs, _ = torch.sort(z)
    cdf = _normal_cdf(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    assert ks * math.sqrt(n) < 1.95  # Kolmogorov critical value at alpha = 0.001
    assert float(z.abs().max()) < 5.8  # the 23-bit uniforms bound |z| by sqrt(48 ln 2)


def test_bases_are_uncorrelated_across_k_blocks_and_seeds():
    n = 1 << 16
    rows = [rng.generate(1, 0, 0, 2, 0, n), rng.generate(1, 1, 0, 1, 0, n), rng.generate(2, 0, 0, 1, 0, n)]
    v = torch.cat(rows).double()
    corr = torch.corrcoef(v)
    off = corr - torch.eye(len(v), dtype=torch.float64)
    assert float(off.abs().max()) < 5 / math.sqrt(n)


def test_rademacher_is_balanced_and_exactly_pm1():
    v = rng.generate(3, 0, 0, 8, 5, 100_003, "rademacher")
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(v.double().mean())) < 5 / math.sqrt(v.numel())


def test_generate_matches_elements_at_unaligned_offsets():
    for dist in rng.DISTRIBUTIONS:
        j0 = 2**32 - 131
        chunk = rng.generate(77, 9, 3, 2, j0, 300, dist)
        assert_bitwise(chunk, dense_basis(77, 2, 300, block=9, offset=j0, k_begin=3, distribution=dist).float())


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "1", True])
def test_bad_seed(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        rng.elements(seed, 0, 0, torch.arange(4))
