"""The public ops on every available backend against a float64 dense reference built
from the contract's basis, plus bitwise agreement of reconstruct across backends."""

import math

import pytest
import torch
from helpers import assert_bitwise, dense_basis

import ferret_kernels as fk
from ferret_kernels import rng

DISTS = list(rng.DISTRIBUTIONS)
SIZES = [1, 3, 4, 131, 4097]
# (dtype, atol, rtol) of an update written into `dtype` against the float64 reference.
OUT_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 1e-2),
    (torch.float16, 2e-3, 2e-3),
]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("offset", [0, 5, 2**32 - 7, 2**40 + 3])
def test_basis_bitwise(backend_device, dist, offset):
    backend, device = backend_device
    got = fk.basis(11, 3, 261, block=4, offset=offset, k_begin=2, distribution=dist, device=device, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (3, 261)
    assert_bitwise(got, dense_basis(11, 3, 261, block=4, offset=offset, k_begin=2, distribution=dist).float())


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("K", [1, 9])
def test_project_matches_float64(backend_device, dist, d, K):
    """Each gamma_k within 1e-5 of sum_j |v_kj x_j| of the float64 projection: the float32
    error scales with that sum, not with gamma_k, which cancellation can bring near zero
    (with K = 1 a norm-relative check failed on about one draw in a few hundred)."""
    backend, device = backend_device
    x = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d * 16 + K))
    basis = dense_basis(5, K, d, distribution=dist)
    got = fk.project(x.float().to(device), 5, K, distribution=dist, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (K,)
    scale = basis.abs() @ x.abs()
    for ref in (basis @ x.float().double(), basis @ x):
        assert bool(((got.double().cpu() - ref).abs() <= 1e-5 * scale).all()), (got, ref, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_project_low_precision_inputs(backend_device, dtype):
    backend, device = backend_device
    x = torch.randn(4097).to(dtype)
    ref = dense_basis(8, 6, 4097) @ x.double()
    got = fk.project(x.to(device), 8, 6, backend=backend)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("d", [1, 3, 4097])
@pytest.mark.parametrize("dtype,atol,rtol", OUT_TOLERANCES)
def test_reconstruct_matches_float64(backend_device, dist, d, dtype, atol, rtol):
    backend, device = backend_device
    K = 7
    out = torch.randn(d).to(dtype)
    gamma = torch.randn(K)
    ref = out.double() + 0.25 * (dense_basis(3, K, d, offset=9, distribution=dist).T @ gamma.double())
    got = out.to(device)
    fk.reconstruct_(got, gamma.to(device), 3, alpha=0.25, offset=9, distribution=dist, backend=backend)
    torch.testing.assert_close(got.cpu().double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dist", DISTS)
def test_adjointness(backend_device, dist):
    backend, device = backend_device
    d, K = 1000, 5
    x = torch.randn(d, device=device)
    g = torch.randn(K, device=device)
    vx = fk.project(x, 21, K, distribution=dist, backend=backend)
    vtg = fk.reconstruct_(torch.zeros(d, device=device), g, 21, distribution=dist, backend=backend)
    lhs = float(torch.dot(vx.double(), g.double()))
    rhs = float(torch.dot(x.double(), vtg.double()))
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("dist", DISTS)
def test_reconstruction_is_unbiased(dist):
    """E[V^T V x] / K = x: the mean over many seeds converges at the Monte-Carlo rate."""
    d, K, seeds = 64, 16, 400
    x = torch.randn(d, dtype=torch.float64)
    total = torch.zeros(d, dtype=torch.float64)
    for seed in range(seeds):
        g = fk.project(x.float(), seed, K, distribution=dist, backend="torch")
        total += fk.reconstruct_(torch.zeros(d), g, seed, distribution=dist, backend="torch").double() / K
    mean = total / seeds
    # Var of one estimate per coordinate <= (|x|^2 + x_j^2 * c) / K; 6 sigma over d coords.
    sigma = math.sqrt(2 * float(x.norm() ** 2) / (K * seeds))
    assert float((mean - x).abs().max()) < 6 * sigma
    assert float((mean - x).norm() / x.norm()) < 0.25


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reconstruct_and_perturb_bitwise_across_backends(fast_backend_device, dist, dtype):
    backend, device = fast_backend_device
    out = torch.randn(2053).to(dtype)
    gamma = torch.randn(6)
    want = out.clone()
    fk.reconstruct_(want, gamma, 2**64 - 3, alpha=-0.7, offset=2**33 + 1, distribution=dist, backend="torch")
    fk.perturb_(want, 2**64 - 3, 40, 1e-3, block=2, distribution=dist, backend="torch")
    got = out.to(device)
    fk.reconstruct_(got, gamma.to(device), 2**64 - 3, alpha=-0.7, offset=2**33 + 1, distribution=dist,
                    backend=backend)
    fk.perturb_(got, 2**64 - 3, 40, 1e-3, block=2, distribution=dist, backend=backend)
    assert_bitwise(got, want)


def test_perturb_adds_one_basis_row(backend_device):
    backend, device = backend_device
    out = torch.randn(300)
    got = out.clone().to(device)
    fk.perturb_(got, 9, 13, -2.5, block=6, backend=backend)
    ref = out.double() - 2.5 * dense_basis(9, 1, 300, block=6, k_begin=13)[0]
    torch.testing.assert_close(got.cpu().double(), ref, atol=1e-5, rtol=1e-5)


def test_project_is_deterministic(backend_device):
    backend, device = backend_device
    x = torch.randn(5000, device=device)
    a = fk.project(x, 1, 12, backend=backend)
    b = fk.project(x, 1, 12, backend=backend)
    assert_bitwise(a, b)


def _ragged_case(dtypes):
    sizes = [300, 1000, 7, 2000, 1]
    counts = [3, 0, 5, 9, 2]
    numels = [500, 1107, 1701]
    xs = [torch.randn(n).to(dt) for n, dt in zip(numels, dtypes, strict=True)]
    return sizes, counts, xs


def _dense_blocks(seed, sizes, counts, dist, block_ids=None):
    mats = []
    for pos, (s, c) in enumerate(zip(sizes, counts, strict=True)):
        blk = pos if block_ids is None else block_ids[pos]
        mats.append(dense_basis(seed, c, s, block=blk, distribution=dist) if c else torch.zeros(0, s, dtype=torch.float64))
    return mats


@pytest.mark.parametrize("dist", DISTS)
def test_project_blocks_over_tensor_list(backend_device, dist):
    backend, device = backend_device
    sizes, counts, xs = _ragged_case([torch.float32, torch.bfloat16, torch.float32])
    block_ids = [10, 11, 12, 13, 2**32 - 1]
    got = fk.project_blocks([x.to(device) for x in xs], sizes, counts, 99, block_ids=block_ids, distribution=dist,
                            backend=backend)
    flat = torch.cat([x.double() for x in xs])
    parts, start = [], 0
    for mat, s in zip(_dense_blocks(99, sizes, counts, dist, block_ids), sizes, strict=True):
        parts.append(mat @ flat[start:start + s])
        start += s
    assert got.shape == (sum(counts),)
    assert rel_err(got, torch.cat(parts)) <= 1e-5


@pytest.mark.parametrize("dist", DISTS)
def test_reconstruct_blocks_matches_float64_and_torch_bits(backend_device, dist):
    backend, device = backend_device
    sizes, counts, xs = _ragged_case([torch.float32, torch.float16, torch.float32])
    gamma = torch.randn(sum(counts))
    flat = torch.cat([x.double() for x in xs])
    update, coef = [], 0
    for mat, c in zip(_dense_blocks(4, sizes, counts, dist), counts, strict=True):
        update.append(mat.T @ gamma[coef:coef + c].double())
        coef += c
    ref = flat + 0.5 * torch.cat(update)
    outs = [x.clone().to(device) for x in xs]
    fk.reconstruct_blocks_(outs, sizes, counts, gamma.to(device), 4, alpha=0.5, distribution=dist, backend=backend)
    torch.testing.assert_close(torch.cat([o.cpu().double() for o in outs]), ref, atol=2e-3, rtol=2e-3)
    torch_outs = [x.clone() for x in xs]
    fk.reconstruct_blocks_(torch_outs, sizes, counts, gamma, 4, alpha=0.5, distribution=dist, backend="torch")
    for a, b in zip(outs, torch_outs, strict=True):
        assert_bitwise(a, b)


def test_single_tensor_blocks_equal_per_block_calls(backend_device):
    backend, device = backend_device
    x = torch.randn(3000, device=device)
    sizes, counts = [1000, 1500, 500], [4, 2, 3]
    got = fk.project_blocks(x, sizes, counts, 5, backend=backend)
    each = [fk.project(x[s:s + n], 5, c, block=b, backend=backend) for b, (s, n, c) in
            enumerate(zip([0, 1000, 2500], sizes, counts, strict=True))]
    torch.testing.assert_close(got, torch.cat(each), atol=1e-5, rtol=1e-5)


# Bad input: every error names the argument.

def test_bad_K_and_lengths():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="K"):
        fk.project(x, 0, 0)
    with pytest.raises(ValueError, match="K"):
        fk.project(x, 0, -3)
    with pytest.raises(ValueError, match="gamma"):
        fk.reconstruct_blocks_(x, [5, 5], [2, 2], torch.zeros(3), 0)
    with pytest.raises(ValueError, match="block_sizes"):
        fk.project_blocks(x, [5, 6], [1, 1], 0)
    with pytest.raises(ValueError, match="counts"):
        fk.project_blocks(x, [5, 5], [1], 0)
    with pytest.raises(ValueError, match="counts"):
        fk.project_blocks(x, [5, 5], [1, -1], 0)


def test_bad_dtype_device_alpha():
    with pytest.raises(TypeError, match="dtype"):
        fk.project(torch.arange(10), 0, 2)
    with pytest.raises(TypeError, match="gamma"):
        fk.reconstruct_(torch.zeros(10), torch.zeros(2, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="alpha"):
        fk.reconstruct_(torch.zeros(10), torch.zeros(2), 0, alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        fk.perturb_(torch.zeros(10), 0, 0, float("inf"))
    with pytest.raises(ValueError, match="contiguous"):
        fk.reconstruct_(torch.zeros(10, 4).T, torch.zeros(2), 0)
    with pytest.raises(ValueError, match="backend"):
        fk.project(torch.zeros(10), 0, 2, backend="gpu")
    with pytest.raises(ValueError, match="distribution"):
        fk.project(torch.zeros(10), 0, 2, distribution="uniform")
    if not torch.cuda.is_available():
        meta = torch.zeros(10, device="meta")
        with pytest.raises((ValueError, RuntimeError), match="backend|device|cuda|CUDA"):
            fk.project(meta, 0, 2, backend="triton")


def test_bad_offsets_and_ids():
    with pytest.raises(ValueError, match="offset"):
        fk.project(torch.zeros(10), 0, 2, offset=-1)
    with pytest.raises(ValueError, match="offset"):
        fk.project(torch.zeros(10), 0, 2, offset=2**62)
    with pytest.raises(ValueError, match="block"):
        fk.project(torch.zeros(10), 0, 2, block=2**32)
    with pytest.raises(ValueError, match="block_ids"):
        fk.project_blocks(torch.zeros(10), [10], [1], 0, block_ids=[-1])
    with pytest.raises(ValueError, match="k"):
        fk.perturb_(torch.zeros(10), 0, 2**32, 1.0)


def test_failed_call_leaves_output_untouched():
    out = torch.randn(10)
    before = out.clone()
    with pytest.raises(ValueError):
        fk.reconstruct_(out, torch.randn(3), 0, alpha=float("nan"))
    assert_bitwise(out, before)


def test_perturb_blocks_adds_basis_k_of_every_block(backend_device):
    backend, device = backend_device
    xs = [torch.randn(70), torch.randn(200)]
    sizes = [100, 170]
    got = [x.clone().to(device) for x in xs]
    fk.perturb_blocks_(got, sizes, 8, 3, 0.5, block_ids=[4, 9], backend=backend)
    flat = torch.cat(xs).double()
    ref = flat + 0.5 * torch.cat([dense_basis(8, 1, 100, block=4, k_begin=3)[0],
                                  dense_basis(8, 1, 170, block=9, k_begin=3)[0]])
    torch.testing.assert_close(torch.cat([g.cpu().double() for g in got]), ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_nan_is_written_as_the_contract_says(backend_device):
    backend, device = backend_device
    out = torch.randn(300).to(torch.bfloat16)
    out[::17] = float("nan")
    got = out.clone().to(device)
    fk.reconstruct_(got, torch.randn(3, device=device), 5, backend=backend)
    bits = got.cpu().view(torch.int16).to(torch.int32) & 0xFFFF
    assert bool((bits[::17] == 0x7FC0).all())
    assert not bool(torch.isnan(got.cpu()[1::17]).any())


@pytest.mark.parametrize("dist", DISTS)
def test_reconstruct_several_seeds_in_one_pass(backend_device, dist):
    backend, device = backend_device
    sizes = [300, 7, 1000]
    seeds = [2**64 - 1, 5, 123456789]
    counts = [[2, 1, 3], [0, 2, 4], [1, 0, 0]]
    gamma = torch.randn(sum(map(sum, counts)))
    xs = [torch.randn(600).to(torch.bfloat16), torch.randn(707)]
    flat = torch.cat([x.double() for x in xs])
    update, coef = torch.zeros_like(flat), 0
    for seed, per_seed in zip(seeds, counts, strict=True):
        start = 0
        for blk, (s, c) in enumerate(zip(sizes, per_seed, strict=True)):
            if c:
                basis_t = dense_basis(seed, c, s, block=blk, distribution=dist).T
                update[start:start + s] += basis_t @ gamma[coef:coef + c].double()
            start += s
            coef += c
    got = [x.clone().to(device) for x in xs]
    fk.reconstruct_blocks_(got, sizes, counts, gamma.to(device), seeds, alpha=-0.5, distribution=dist, backend=backend)
    torch.testing.assert_close(torch.cat([g.cpu().double() for g in got]), flat - 0.5 * update, atol=2e-2, rtol=1e-2)
    torch_out = [x.clone() for x in xs]
    fk.reconstruct_blocks_(torch_out, sizes, counts, gamma, seeds, alpha=-0.5, distribution=dist, backend="torch")
    for a, b in zip(got, torch_out, strict=True):
        assert_bitwise(a, b)


def test_several_seeds_bad_input():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="counts"):
        fk.reconstruct_blocks_(x, [10], [1], torch.zeros(1), [1, 2])
    with pytest.raises(ValueError, match="repeats"):
        fk.reconstruct_blocks_(x, [10], [[1], [1]], torch.zeros(2), [3, 3])
    with pytest.raises(ValueError, match="gamma"):
        fk.reconstruct_blocks_(x, [10], [[1], [2]], torch.zeros(2), [3, 4])


# The backends: one interface, found by name.

def test_every_backend_implements_the_protocol():
    import inspect

    from ferret_kernels import backends

    for name in backends.NAMES:
        if name == "triton" and not backends.triton_available():
            continue
        if name == "cpp" and backends.cpu_extension() is None:
            continue
        impl = backends.module(name)
        for op, spec in inspect.getmembers(backends.Backend, inspect.isfunction):
            if op.startswith("_"):
                continue
            want = list(inspect.signature(spec).parameters)[1:]
            assert list(inspect.signature(getattr(impl, op)).parameters) == want, (name, op)


def test_backend_names_and_the_cpu_alias(monkeypatch):
    from ferret_kernels import backends

    monkeypatch.delenv("FERRET_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert backends.resolve("torch", cpu) == "torch"
    assert backends.module("cpu") is backends.module("cpp")
    with pytest.raises(ValueError, match="backend"):
        backends.module("gpu")
    with pytest.raises(ValueError, match="resolve"):
        backends.module("auto")
    if backends.cpu_extension() is not None:
        assert backends.resolve("cpu", cpu) == backends.resolve("cpp", cpu) == "cpp"
        x = torch.randn(1000)
        assert_bitwise(fk.project(x, 3, 5, backend="cpu"), fk.project(x, 3, 5, backend="cpp"))
    monkeypatch.setenv("FERRET_BACKEND", "torch")
    assert backends.resolve("auto", cpu) == "torch"


@pytest.mark.parametrize("dist", DISTS)
def test_generate_sum_is_the_sum_of_the_basis_on_every_backend(backend_device, dist):
    from ferret_kernels import backends

    backend, device = backend_device
    want = float(dense_basis(4, 3, 1000, distribution=dist).float().double().sum())
    got = backends.module(backend).generate_sum(4, 3, 1000, dist, torch.device(device))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-3)
