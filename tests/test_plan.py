"""Block grouping (the paper's rule and sized blocks), exact budget allocation, and the
FerretPlan: parameter checks, fingerprint, per-block norms, coefficient scales, seeds."""

import math

import pytest
import torch

from ferret_kernels import plan


def llama_numels(layers: int, hidden: int, intermediate: int, vocab: int, kv: int | None = None) -> list[int]:
    """Parameter sizes of a HF LLaMA in named_parameters order (untied lm_head)."""
    kv = hidden if kv is None else kv
    per_layer = [hidden * hidden, kv * hidden, kv * hidden, hidden * hidden,
                 intermediate * hidden, intermediate * hidden, hidden * intermediate, hidden, hidden]
    return [vocab * hidden] + per_layer * layers + [hidden, vocab * hidden]


def test_paper_grouping_gives_194_blocks_for_24_layer_llama():
    numels = llama_numels(24, 2048, 5504, 32000)
    blocks = plan.paper_blocks(numels)
    assert len(blocks) == 194
    assert [i for b in blocks for i in b] == list(range(len(numels)))


def test_grouping_merges_small_tensors_only():
    # median 100, so a block closes before it would pass 90 elements
    blocks = plan.paper_blocks([100, 100, 100, 5, 5, 5, 100, 100, 5])
    assert blocks == [[0], [1], [2], [3, 4, 5], [6], [7], [8]]


@pytest.mark.parametrize("budget", [5, 7, 100, 7800])
@pytest.mark.parametrize("method", plan.ALLOCATIONS)
def test_allocation_sums_to_budget(budget, method):
    norms = [0.0, 3.0, 1.0, 1e-9, 10.0]
    sizes = [10, 20, 30, 40, 50]
    counts = plan.allocate(budget, plan.allocation_weights(method, norms, sizes))
    assert sum(counts) == budget
    assert min(counts) >= 1


def test_allocation_is_proportional():
    assert plan.allocate(104, [1.0, 3.0, 0.0, 6.0]) == [11, 31, 1, 61]
    assert plan.allocate(4, [0.0, 0.0, 0.0, 0.0]) == [1, 1, 1, 1]


def test_allocation_rejects_bad_input():
    with pytest.raises(ValueError, match="budget"):
        plan.allocate(2, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        plan.allocate(10, [1.0, float("nan")])
    with pytest.raises(ValueError, match="allocation"):
        plan.allocation_weights("magic", [1.0], [1])


def test_sized_blocks_packs_and_splits():
    # 10 > 8 splits in two; 3 + 3 pack; 25 splits in four near-equal parts
    assert plan.sized_blocks([10, 3, 3, 25, 4], 8) == [5, 5, 6, 7, 6, 6, 6, 4]
    assert plan.sized_blocks([1, 1, 1], 100) == [3]
    with pytest.raises(ValueError, match="grouping"):
        plan.sized_blocks([4], 0)


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def test_plan_from_model_blocks_and_names():
    model = tiny_model()
    p = plan.FerretPlan.from_model(model, 12)
    assert p.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert p.block_sizes == (30, 5, 15, 3) and p.numel == 53 and p.num_blocks == 4
    assert p.block_names == (("0.weight",), ("0.bias",), ("2.weight",), ("2.bias",))
    sized = plan.FerretPlan.from_model(model, 12, grouping=20)
    assert sum(sized.block_sizes) == 53 and max(sized.block_sizes) <= 20
    assert sized.block_names[0] == ("0.weight",) and "0.bias" in sized.block_names[2]
    assert [x is y for x, y in zip(p.parameters(model), model.parameters(), strict=True)] == [True] * 4


def test_plan_skips_frozen_and_tied_parameters():
    model = tiny_model()
    model[0].bias.requires_grad_(False)
    tied = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 7, bias=False))
    tied[1].weight = tied[0].weight
    assert plan.FerretPlan.from_model(model, 10).names == ("0.weight", "2.weight", "2.bias")
    assert plan.FerretPlan.from_model(tied, 4).names == ("0.weight",)


def test_fingerprint_is_stable_and_sensitive():
    model = tiny_model()
    base = plan.FerretPlan.from_model(model, 12)
    assert base.fingerprint == plan.FerretPlan.from_model(tiny_model(), 12).fingerprint
    # budget, allocation, scale and backend are runtime choices, checked elsewhere
    assert base.fingerprint == plan.FerretPlan.from_model(model, 40, allocation="uniform", backend="torch").fingerprint
    assert len(base.fingerprint) == 64
    others = [
        plan.FerretPlan.from_model(model, 12, grouping=16),
        plan.FerretPlan.from_model(model, 12, grouping="tensor"),
        plan.FerretPlan.from_model(model, 12, distribution="rademacher"),
        plan.FerretPlan.from_model(model.to(torch.bfloat16), 12),
        plan.FerretPlan.from_model(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                                       torch.nn.Linear(5, 4)), 12),
    ]
    assert len({base.fingerprint, *(o.fingerprint for o in others)}) == 6


def test_plan_checks_the_model():
    p = plan.FerretPlan.from_model(tiny_model(), 12)
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    with pytest.raises(ValueError, match="shape"):
        p.parameters(other)
    with pytest.raises(ValueError, match="dtype"):
        p.parameters(tiny_model().half())
    with pytest.raises(ValueError, match="trainable parameters"):
        p.parameters(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="budget"):
        plan.FerretPlan.from_model(tiny_model(), 3)


def test_plan_allocation_and_norms():
    model = tiny_model()
    p = plan.FerretPlan.from_model(model, 50)
    params = p.parameters(model)
    norms = p.block_norms(params)
    assert norms == pytest.approx([float(t.detach().double().norm()) for t in params], rel=1e-6)
    for method in plan.ALLOCATIONS:
        counts = p.counts_for(norms, method)
        assert sum(counts) == 50 and min(counts) >= 1
    with pytest.raises(ValueError, match="diverged"):
        p.counts_for([1.0, float("nan"), 1.0, 1.0])
    sized = plan.FerretPlan.from_model(model, 50, grouping=7)
    flat = torch.cat([t.detach().reshape(-1).double() for t in params])
    expect = [float(c.norm()) for c in torch.split(flat, list(sized.block_sizes))]
    assert sized.block_norms(params) == pytest.approx(expect, rel=1e-6)


def test_coefficient_scale_and_parity_factor():
    p = plan.FerretPlan.from_model(tiny_model(), 12)
    s = p.coefficient_scale([4, 3, 3, 2])
    assert s.dtype == torch.float32 and s.shape == (12,)
    assert s.tolist() == pytest.approx([1 / 4] * 4 + [1 / 3] * 6 + [1 / 2] * 2)
    # N(0,1) truncated to [-1, 1] has variance 1 - 2 phi(1) / (2 Phi(1) - 1)
    phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    assert plan.parity_factor(1) == pytest.approx(1 - 2 * phi1 / math.erf(1 / math.sqrt(2)), rel=1e-12)
    assert plan.parity_factor(10**8) == pytest.approx(1 / 3, rel=1e-7)
    paper = p.coefficient_scale([4, 3, 3, 2], "paper")
    assert paper[0].item() == pytest.approx(plan.parity_factor(30) / 4, rel=1e-6)


def test_round_seed_schedules():
    assert plan.round_seed(7, 3, "fixed") == 7
    seeds = {plan.round_seed(7, r) for r in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**64 for s in seeds)
    assert plan.round_seed(7, 3) == plan.round_seed(7, 3) != plan.round_seed(8, 3)
    with pytest.raises(ValueError, match="schedule"):
        plan.round_seed(7, 3, "random")
