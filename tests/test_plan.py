"""Block grouping (the paper's rule) and exact budget allocation."""

import pytest

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
