"""The C++ CPU backend (ferret_kernels._C through ferret_kernels.backends.cpp, backend="cpp").

Basis values and the reconstruct family must be bit-identical to the RNG contract
(``rng``, the torch backend) and to the Triton kernels (run here in Triton's CPU
interpreter); project must be accurate and return the same bits on every call and for
any thread count. Skipped when the extension is not built.
"""

import os

# Before anything imports triton: its kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_C = pytest.importorskip("ferret_kernels._C")

from helpers import assert_bitwise, dense_basis  # noqa: E402

import ferret_kernels as fk  # noqa: E402
from ferret_kernels import rng  # noqa: E402

DISTS = rng.DISTRIBUTIONS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_or_skip():
    pytest.importorskip("triton")
    from ferret_kernels import config

    if not config.triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 was not in effect when the test session started")


@pytest.fixture
def threads():
    """Restore torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# (seed, K, d, block, offset, k_begin): odd and prime sizes, tile and 2**32 edges of the
# element / call / block / k counter words, seeds at both ends of uint64.
BASIS_CASES = [
    (0, 1, 1, 0, 0, 0),
    (1, 3, 3, 0, 0, 0),
    (2**64 - 1, 2, 4097, 2**32 - 1, 0, 0),
    (2**64 - 2, 3, 127, 5, 2**32 - 60, 2**32 - 3),
    (7, 2, 131, 1, 2**34 - 70, 0),  # gaussian call index crosses 2**32
    (11, 2, 509, 9, 2**39 - 200, 0),  # rademacher call index crosses 2**32
    (13, 2, 1031, 3, 2**40 + 1, 1),
    (2**63 + 5, 4, 2053, 0, 5, 7),
    (17, 2, 40009, 2, 3, 0),  # more than one work unit
]


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("case", BASIS_CASES, ids=lambda c: f"K{c[1]}-d{c[2]}-off{c[4]}")
def test_basis_matches_rng(case, distribution):
    seed, K, d, block, offset, k_begin = case
    got = _C.basis_rows(seed, K, d, block, offset, k_begin, distribution)
    want = rng.generate(seed, block, k_begin, K, offset, d, distribution)
    assert_bitwise(got, want)


@pytest.mark.parametrize("distribution", DISTS)
def test_basis_public_api_matches_torch_backend(distribution):
    args = dict(block=3, offset=2**32 - 9, k_begin=4, distribution=distribution)
    got = fk.basis(2**64 - 3, 5, 1001, backend="cpp", **args)
    assert_bitwise(got, fk.basis(2**64 - 3, 5, 1001, backend="torch", **args))


def test_basis_elements_agree_with_rng_elements():
    """Spot checks against the per-element form of the contract at scattered indices."""
    j = torch.tensor([0, 1, 2, 3, 4, 127, 128, 2**32 - 1, 2**32, 2**40 + 3])
    for distribution in DISTS:
        want = rng.elements(99, 6, 2, j, distribution)
        got = torch.stack([_C.basis_rows(99, 1, 1, 6, int(i), 2, distribution)[0, 0] for i in j])
        assert_bitwise(got, want)


def _ragged_tensors(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1000,), (37, 3), (2050,), (5,)]
    return [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes, strict=True)]


# 3166 elements over 6 blocks: blocks straddle tensors, a tensor holds several blocks,
# one block has no bases, block ids are sparse and reach 2**32 - 1.
RAGGED = dict(block_sizes=[500, 700, 1, 1066, 600, 299], counts=[3, 0, 2, 5, 1, 4],
              block_ids=[9, 2, 2**32 - 1, 0, 7, 123456])


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reconstruct_blocks_matches_torch(distribution, dtype):
    gamma = torch.randn(sum(RAGGED["counts"]), generator=torch.Generator().manual_seed(1))
    outs = {}
    for backend in ("cpp", "torch"):
        tensors = _ragged_tensors([dtype] * 4)
        fk.reconstruct_blocks_(tensors, RAGGED["block_sizes"], RAGGED["counts"], gamma, 2**64 - 7, alpha=-0.3,
                               block_ids=RAGGED["block_ids"], distribution=distribution, backend=backend)
        outs[backend] = tensors
    for a, b in zip(outs["cpp"], outs["torch"], strict=True):
        assert_bitwise(a, b)


@pytest.mark.parametrize("distribution", DISTS)
def test_reconstruct_blocks_mixed_dtypes(distribution):
    gamma = torch.randn(sum(RAGGED["counts"]), generator=torch.Generator().manual_seed(2)) * 1e-2
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    outs = {}
    for backend in ("cpp", "torch"):
        tensors = _ragged_tensors(dtypes, seed=3)
        fk.reconstruct_blocks_(tensors, RAGGED["block_sizes"], RAGGED["counts"], gamma, 42, alpha=1 / 3,
                               block_ids=RAGGED["block_ids"], distribution=distribution, backend=backend)
        outs[backend] = tensors
    for a, b in zip(outs["cpp"], outs["torch"], strict=True):
        assert_bitwise(a, b)


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reconstruct_and_perturb_match_torch(distribution, dtype):
    x = torch.randn(3, 1777, generator=torch.Generator().manual_seed(4)).to(dtype)
    gamma = torch.randn(6, generator=torch.Generator().manual_seed(5))
    for offset in (0, 2**32 - 1000, 2**40 + 77):
        a, b = x.clone(), x.clone()
        for out, backend in ((a, "cpp"), (b, "torch")):
            fk.reconstruct_(out, gamma, 2**64 - 1, alpha=0.7, block=11, offset=offset, distribution=distribution,
                            backend=backend)
            fk.perturb_(out, 5, 2**32 - 1, -1e-3, block=2, offset=offset, distribution=distribution,
                        backend=backend)
        assert_bitwise(a, b)


@pytest.mark.parametrize("distribution", DISTS)
def test_reconstruct_large_tensor_matches_torch(distribution, threads):
    """Several work units and both thread counts (2**17 + 5 elements, K = 3)."""
    x = torch.randn(2**17 + 5, generator=torch.Generator().manual_seed(6))
    gamma = torch.randn(3, generator=torch.Generator().manual_seed(7))
    want = x.clone()
    fk.reconstruct_(want, gamma, 8, offset=999, distribution=distribution, backend="torch")
    for n in (1, 2):
        torch.set_num_threads(n)
        got = x.clone()
        fk.reconstruct_(got, gamma, 8, offset=999, distribution=distribution, backend="cpp")
        assert_bitwise(got, want)


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reconstruct_matches_triton(distribution, dtype):
    triton_or_skip()
    tensors = {b: [torch.randn(700, generator=torch.Generator().manual_seed(8)).to(dtype),
                   torch.randn(2, 655, generator=torch.Generator().manual_seed(9)).to(dtype)]
               for b in ("cpp", "triton")}
    gamma = torch.randn(5, generator=torch.Generator().manual_seed(10))
    for backend, ts in tensors.items():
        fk.reconstruct_blocks_(ts, [300, 1710], [2, 3], gamma, 2**64 - 11, alpha=0.25, block_ids=[2**32 - 1, 6],
                               distribution=distribution, backend=backend)
    for a, b in zip(tensors["cpp"], tensors["triton"], strict=True):
        assert_bitwise(a, b)


@pytest.mark.parametrize("distribution", DISTS)
def test_perturb_and_basis_match_triton(distribution):
    triton_or_skip()
    x = torch.randn(1030, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    a, b = x.clone(), x.clone()
    fk.perturb_(a, 3, 7, 0.01, block=1, offset=2**34 - 500, distribution=distribution, backend="cpp")
    fk.perturb_(b, 3, 7, 0.01, block=1, offset=2**34 - 500, distribution=distribution, backend="triton")
    assert_bitwise(a, b)
    args = dict(block=5, offset=2**40 - 3, k_begin=2, distribution=distribution)
    assert_bitwise(fk.basis(12, 2, 300, backend="cpp", **args), fk.basis(12, 2, 300, backend="triton", **args))


def test_bfloat16_nan_rounds_to_canonical_nan():
    """The contract's bf16 rounding: NaN -> 0x7FC0 whatever its sign or payload; the
    rest round to nearest even. (torch's own vectorised float->bf16 cast on AVX-512
    gives 0xFFFF for NaN, so this is checked against the contract, not the torch backend.)"""
    x = torch.tensor([float("nan"), -float("nan"), float("inf"), 1.0, -2.0, 3e38], dtype=torch.bfloat16)
    y = x.clone()
    fk.reconstruct_(y, torch.tensor([1.0, -1.0]), 3, alpha=1e38, backend="cpp")
    v = fk.basis(3, 2, 6, backend="cpp")
    acc = (torch.tensor(0.0) + 1.0 * v[0]) + -1.0 * v[1]
    want = x.float() + torch.tensor(1e38, dtype=torch.float32) * acc
    u = want.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    rounded = torch.where(torch.isnan(want), torch.tensor(0x7FC0), rounded)
    assert (y.view(torch.int16).to(torch.int64) & 0xFFFF).tolist() == rounded.tolist()
    assert (y.view(torch.int16)[:2].to(torch.int64) & 0xFFFF).tolist() == [0x7FC0, 0x7FC0]


def test_float16_specials_match_torch():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 65504.0, 6e-8, -3e-5, 0.0, -0.0, 1.0],
                     dtype=torch.float16)
    gamma = torch.tensor([1e-3, -2e-3])
    a, b = x.clone(), x.clone()
    fk.reconstruct_(a, gamma, 3, alpha=1e-4, backend="cpp")
    fk.reconstruct_(b, gamma, 3, alpha=1e-4, backend="torch")
    assert_bitwise(a, b)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_every_16_bit_pattern_round_trips_like_torch(dtype):
    """All 65536 values as `out` with gamma = 0: each converts to float32, adds 0 and
    rounds back, as the torch backend does. NaNs only have to stay NaN (bf16: 0x7FC0)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    a, b = x.clone(), x.clone()
    fk.reconstruct_(a, torch.zeros(2), 5, alpha=0.5, backend="cpp")
    fk.reconstruct_(b, torch.zeros(2), 5, alpha=0.5, backend="torch")
    nan = torch.isnan(x)
    assert_bitwise(a[~nan], b[~nan])
    assert torch.isnan(a[nan]).all()
    if dtype == torch.bfloat16:
        assert (a[nan].view(torch.int16) == 0x7FC0).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("alpha", (2.0**-30, 2.0**-20, 2.0**-14, 1e-3, 1.0, 2.0**12, 2.0**15, 2.0**16, 1e39))
def test_rounding_to_16_bit_matches_torch(dtype, alpha):
    """out = round(0 + alpha * v) over 20000 gaussian v: subnormal, normal and overflowing
    results of the float32 -> bf16 / fp16 rounding."""
    a = torch.zeros(20_000, dtype=dtype)
    b = a.clone()
    fk.reconstruct_(a, torch.ones(1), 9, alpha=alpha, backend="cpp")
    fk.reconstruct_(b, torch.ones(1), 9, alpha=alpha, backend="torch")
    assert_bitwise(a, b)


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_matches_float64(distribution, dtype):
    d, K, offset = 40_009, 9, 2**32 - 11  # crosses a work-unit boundary at 2**32
    x = torch.randn(d, generator=torch.Generator().manual_seed(12)).to(dtype)
    got = fk.project(x, 2**64 - 5, K, block=4, offset=offset, distribution=distribution, backend="cpp")
    V = dense_basis(2**64 - 5, K, d, block=4, offset=offset, distribution=distribution)
    want = V @ x.double()
    assert got.dtype == torch.float32 and got.shape == (K,)
    rel = (got.double() - want).norm() / want.norm()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("distribution", DISTS)
def test_project_blocks_mixed_dtypes_matches_float64(distribution):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    tensors = _ragged_tensors(dtypes, seed=13)
    got = fk.project_blocks(tensors, RAGGED["block_sizes"], RAGGED["counts"], 77, block_ids=RAGGED["block_ids"],
                            distribution=distribution, backend="cpp")
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    want, start = [], 0
    for size, count, bid in zip(RAGGED["block_sizes"], RAGGED["counts"], RAGGED["block_ids"], strict=True):
        if count:
            want.append(dense_basis(77, count, size, block=bid, distribution=distribution) @ flat[start:start + size])
        start += size
    want = torch.cat(want)
    rel = (got.double() - want).abs().max() / want.abs().max()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("distribution", DISTS)
def test_project_is_deterministic_across_calls_and_threads(distribution, threads):
    # 9 work units and 2 chunks of bases per unit, so threads really split the work.
    x = torch.randn(2**18 + 3, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    runs = []
    for n in (1, 2, 2, 1):
        torch.set_num_threads(n)
        runs.append(fk.project(x, 31, 70, offset=5, distribution=distribution, backend="cpp"))
    for r in runs[1:]:
        assert_bitwise(r, runs[0])
    # Accuracy too, against float64 on the (separately verified) C++ basis.
    ref = _C.basis_rows(31, 70, x.numel(), 0, 5, 0, distribution).double() @ x.double()
    assert ((runs[0].double() - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize("distribution", DISTS)
def test_generate_sum_is_the_sum_of_the_basis(distribution):
    from ferret_kernels.backends import cpp

    K, d = 3, 5000
    want = fk.basis(0, K, d, distribution=distribution, backend="cpp").double().sum().item()
    assert math.isclose(cpp.generate_sum(0, K, d, distribution, "cpu"), want, rel_tol=1e-5, abs_tol=1e-2)


def test_auto_backend_on_cpu_is_cpp(monkeypatch):
    from ferret_kernels import backends

    monkeypatch.delenv("FERRET_BACKEND", raising=False)
    assert backends.resolve("auto", torch.device("cpu")) == "cpp"
    assert backends.resolve("cpu", torch.device("cpu")) == "cpp"
    assert _C.simd_target() in ("avx512f", "avx2", "default")


# ----------------------------------------------------------------------------------
# The raw extension checks what it is given.

def _tables(n=10, count=2):
    seg = torch.tensor([[0, 0, n, 0, 0]], dtype=torch.int64)
    blk = torch.tensor([[count, 0, 0, 0]], dtype=torch.int64)
    return seg, blk


def test_raw_project_rejects_bad_views():
    seg, blk = _tables()
    with pytest.raises(RuntimeError, match="dtype"):
        _C.project([torch.zeros(10, dtype=torch.int32)], seg, blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.project([torch.zeros(20)[::2]], seg, blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="CPU"):
        _C.project([torch.zeros(10, device="meta")], seg, blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="empty"):
        _C.project([], seg, blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="distribution"):
        _C.project([torch.zeros(10)], seg, blk, 2, 0, "uniform")


def test_raw_tables_are_checked():
    x = [torch.zeros(10)]
    seg, blk = _tables()
    with pytest.raises(RuntimeError, match="int64"):
        _C.project(x, seg.int(), blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="shape"):
        _C.project(x, seg[:, :4].contiguous(), blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="outside"):
        _C.project(x, torch.tensor([[0, 5, 6, 0, 0]]), blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="tensor index"):
        _C.project(x, torch.tensor([[1, 0, 10, 0, 0]]), blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="block"):
        _C.project(x, torch.tensor([[0, 0, 10, 1, 0]]), blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="2\\*\\*62"):
        _C.project(x, torch.tensor([[0, 0, 10, 0, 2**62 - 5]]), blk, 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="coefficients"):
        _C.project(x, seg, blk, 1, 0, "gaussian")
    with pytest.raises(RuntimeError, match="block id"):
        _C.project(x, seg, torch.tensor([[2, 2**32, 0, 0]]), 2, 0, "gaussian")
    with pytest.raises(RuntimeError, match="k_begin"):
        _C.project(x, seg, torch.tensor([[2, 0, 0, 2**32 - 1]]), 2, 0, "gaussian")


def test_raw_reconstruct_checks_gamma():
    x = [torch.zeros(10)]
    seg, blk = _tables()
    with pytest.raises(RuntimeError, match="float32"):
        _C.reconstruct_(x, seg, blk, torch.zeros(2, dtype=torch.float64), [0], 1.0, "gaussian")
    with pytest.raises(RuntimeError, match="coefficients"):
        _C.reconstruct_(x, seg, blk, torch.zeros(1), [0], 1.0, "gaussian")
    with pytest.raises(RuntimeError, match="1-D"):
        _C.reconstruct_(x, seg, blk, torch.zeros(1, 2), [0], 1.0, "gaussian")
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.reconstruct_(x, seg, blk, torch.zeros(4)[::2], [0], 1.0, "gaussian")
    with pytest.raises((TypeError, OverflowError)):
        _C.reconstruct_(x, seg, blk, torch.zeros(2), [-1], 1.0, "gaussian")
    with pytest.raises((TypeError, OverflowError)):
        _C.reconstruct_(x, seg, blk, torch.zeros(2), [2**64], 1.0, "gaussian")
    with pytest.raises(RuntimeError, match="seeds"):
        _C.reconstruct_(x, seg, blk, torch.zeros(2), [], 1.0, "gaussian")
    with pytest.raises(RuntimeError, match="per seed"):
        _C.reconstruct_(x, seg, blk, torch.zeros(2), [0, 1], 1.0, "gaussian")
    x0 = x[0].clone()
    _C.reconstruct_(x, seg, blk, torch.zeros(2), [0], 1.0, "gaussian")  # valid: adds 0 * v
    assert_bitwise(x[0], x0)


def test_raw_basis_and_generate_sum_check_ranges():
    with pytest.raises(RuntimeError, match="K and d"):
        _C.basis_rows(0, -1, 5, 0, 0, 0, "gaussian")
    with pytest.raises(RuntimeError, match="block"):
        _C.basis_rows(0, 1, 5, 2**32, 0, 0, "gaussian")
    with pytest.raises(RuntimeError, match="k_begin"):
        _C.basis_rows(0, 2, 5, 0, 0, 2**32 - 1, "gaussian")
    with pytest.raises(RuntimeError, match="offset"):
        _C.basis_rows(0, 1, 5, 0, 2**62 - 2, 0, "rademacher")
    with pytest.raises(RuntimeError, match="distribution"):
        _C.generate_sum(0, 1, 5, "normal")
    with pytest.raises(RuntimeError, match="d must"):
        _C.generate_sum(0, 1, -5, "gaussian")
