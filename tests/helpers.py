"""What the tests share: the dense basis every op is checked against, the bitwise
assertion every cross-backend test uses, and the tiny model the message tests train."""

from __future__ import annotations

import torch

from ferret_kernels import rng

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def dense_basis(seed: int, K: int, d: int, *, block: int = 0, offset: int = 0, k_begin: int = 0,
                distribution: str = "gaussian") -> torch.Tensor:
    """float64 (K, d): row k is basis k_begin + k of ``block``, elements offset ..
    offset + d - 1, from the pointwise contract (``rng.elements``) and nothing else."""
    k = torch.arange(k_begin, k_begin + K)[:, None]
    j = torch.arange(offset, offset + d)[None, :]
    return rng.elements(seed, block, k, j, distribution).double()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float32 / bfloat16 / float16 tensor, as integers."""
    return t.view(_INT_VIEW[t.dtype])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaNs included); says how many elements differ and where."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    diff = bits(got) != bits(want)
    assert not diff.any(), f"{int(diff.sum())} of {got.numel()} elements differ, first at {diff.nonzero()[0].tolist()}"


def tiny_model(seed: int = 0, sizes: tuple[int, int, int] = (6, 5, 3)) -> torch.nn.Module:
    """Linear(sizes[0], sizes[1]) -> ReLU -> Linear(sizes[1], sizes[2]), seeded."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(),
                               torch.nn.Linear(sizes[1], sizes[2]))
