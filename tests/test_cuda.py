"""On a CUDA GPU only (``-m cuda``; skipped elsewhere): the Triton kernels at sizes the
CPU interpreter cannot reach, bit for bit against the CPU backends, and a round
aggregated and applied on the GPU, replayed on CPU clients with the same bits."""

import copy

import pytest
import torch
from helpers import assert_bitwise

import ferret_kernels as fk
from ferret_kernels import backends, rng, wire
from ferret_kernels.plan import FerretPlan

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DISTS = list(rng.DISTRIBUTIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes past one tile of every kernel shape, and one past 2**24 elements so tile and
# item indices leave the small-integer range.
SIZES = [4099, 1_000_003, 2**24 + 5]
CPU_BACKENDS = ["torch"] + (["cpp"] if backends.cpu_extension() else [])
SEED = 2**64 - 3


def _cpu_reference_backend(d: int) -> str:
    """The torch reference is exact but slow; above a million elements the C++ backend
    (itself tested bitwise against it) stands in where it is built."""
    return "cpp" if d > 1_000_003 and "cpp" in CPU_BACKENDS else "torch"


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("offset", [0, 2**32 - 3, 2**40 + 7])
def test_basis_matches_cpu_backends(dist, offset):
    got = fk.basis(SEED, 5, 4099, block=2**32 - 1, offset=offset, distribution=dist, device="cuda",
                   backend="triton")
    for backend in CPU_BACKENDS:
        want = fk.basis(SEED, 5, 4099, block=2**32 - 1, offset=offset, distribution=dist, backend=backend)
        assert_bitwise(got, want)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", SIZES)
def test_reconstruct_and_perturb_bitwise_at_scale(dist, dtype, d):
    g = torch.Generator().manual_seed(d)
    start = torch.randn(d, generator=g).to(dtype)
    gamma = torch.randn(7, generator=g)
    want = start.clone()
    ref = _cpu_reference_backend(d)
    fk.reconstruct_(want, gamma, SEED, alpha=-0.7, block=3, offset=2**33 + 1, distribution=dist, backend=ref)
    fk.perturb_(want, SEED, 40, 1e-3, block=2, offset=2**32 - 1, distribution=dist, backend=ref)
    got = start.cuda()
    fk.reconstruct_(got, gamma.cuda(), SEED, alpha=-0.7, block=3, offset=2**33 + 1, distribution=dist,
                    backend="triton")
    fk.perturb_(got, SEED, 40, 1e-3, block=2, offset=2**32 - 1, distribution=dist, backend="triton")
    assert_bitwise(got, want)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", SIZES)
def test_project_within_float64_tolerance_at_scale(dist, dtype, d):
    """Each coefficient against a float64 sum over the same basis rows (from the C++ or
    torch backend's bitwise basis): fp32 accumulation of d terms of size ~|x_j| stays
    within ~sqrt(d) * 2**-24 of sum |x_j|."""
    K = 5
    x = torch.randn(d, generator=torch.Generator().manual_seed(d + 1)).to(dtype)
    got = fk.project(x.cuda(), SEED, K, block=1, offset=2**32 + 9, distribution=dist, backend="triton").cpu()
    ref_backend = _cpu_reference_backend(d)
    want = torch.empty(K, dtype=torch.float64)
    bound = torch.empty(K, dtype=torch.float64)
    for k in range(K):
        row = fk.basis(SEED, k + 1, d, block=1, offset=2**32 + 9, distribution=dist, backend=ref_backend)[k]
        terms = row.double() * x.double()
        want[k] = terms.sum()
        bound[k] = terms.abs().sum() * (d**0.5) * 2.0**-24 * 4
    assert got.dtype == torch.float32
    assert torch.all((got.double() - want).abs() <= bound), (got, want, bound)


@pytest.mark.parametrize("dist", DISTS)
def test_project_is_deterministic_on_the_gpu(dist):
    x = torch.randn(2**22 + 3, device="cuda")
    first = fk.project(x, 11, 33, distribution=dist, backend="triton")
    for _ in range(3):
        assert_bitwise(fk.project(x, 11, 33, distribution=dist, backend="triton"), first)


def _tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_round_replays_bitwise_on_cpu_clients(dist, dtype):
    """Clients train on the GPU, the server aggregates and applies there; a CPU client
    replaying the downlink (each CPU backend) holds the server's bits."""
    model = _tiny_llama(dtype)
    cpu_model = copy.deepcopy(model)
    gpu_model = model.cuda()
    plan = FerretPlan.from_model(gpu_model, 300, distribution=dist)
    agg = fk.Aggregator(plan, round=1, base_seed=2025, server_lr=2.0)
    for i in range(3):
        client = copy.deepcopy(gpu_model)
        tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(i)).cuda()
        opt = torch.optim.SGD(client.parameters(), lr=0.5)
        with plan.client_round(client, round=1, seed=agg.seed, num_samples=2 + i) as cr:
            opt.zero_grad()
            client(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
        agg.add(wire.decode_client_update(wire.encode_client_update(cr.update), plan, round=1))
    payload = wire.encode_global_update(agg.apply_(gpu_model))
    for backend in CPU_BACKENDS:
        replica = copy.deepcopy(cpu_model)
        cpu_plan = FerretPlan.from_model(replica, 300, distribution=dist, backend=backend)
        wire.decode_global_update(payload, cpu_plan, round=1).apply_(replica)
        moved = 0
        for p, q, s in zip(replica.parameters(), gpu_model.parameters(), cpu_model.parameters(), strict=True):
            assert_bitwise(p, q)
            moved += int(not torch.equal(p, s))
        assert moved > 0, "the round moved no weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_snapshot_gives_the_same_update_and_restores_exactly(dtype):
    """``snapshot_device="cpu"`` (pinned, asynchronous copies) against the snapshot on the
    GPU: the same coefficients, and w_start back bit for bit."""
    model = _tiny_llama(dtype).cuda()
    start = [p.detach().clone() for p in model.parameters()]
    plan = FerretPlan.from_model(model, 300)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3)).cuda()
    updates = []
    for where in (None, "cpu"):
        torch.manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with plan.client_round(model, round=1, seed=99, snapshot_device=where) as cr:
            opt.zero_grad()
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
        updates.append(cr.update)
        for p, s in zip(model.parameters(), start, strict=True):
            assert_bitwise(p, s)
    assert updates[0].counts == updates[1].counts
    assert_bitwise(updates[1].coefficients, updates[0].coefficients)
