"""The C++ CPU backend: the ops of ``backends.Backend`` on the compiled ``ferret_kernels._C``.

Each op is one C++ call covering every block of the layout. The layout goes over as the
two int64 tables of ``layout.py`` (segments (S, 5), blocks (G * L, 4)); the C++ side
checks them before touching memory. Results are bit-identical to the torch backend for
``basis_rows`` and ``reconstruct_seeds``; ``project_segments`` is deterministic (the same
bits for any thread count) and accumulates in float32.
"""

from __future__ import annotations

import torch

from .. import _C
from ..layout import BlockLayout, SegmentTable, block_table


def basis_rows(seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
               device) -> torch.Tensor:
    return _C.basis_rows(seed, K, d, block, offset, k_begin, distribution).to(device)


def project_segments(views: list[torch.Tensor], cut: SegmentTable, layout: BlockLayout, seed: int,
                     distribution: str) -> torch.Tensor:
    blocks = torch.from_numpy(block_table([layout]))
    return _C.project(views, cut.table, blocks, layout.total_count, seed, distribution)


def reconstruct_seeds(views: list[torch.Tensor], cut: SegmentTable, layouts: list[BlockLayout],
                      gamma: torch.Tensor, seeds: list[int], alpha: float, distribution: str,
                      k_begins: list[list[int] | None] | None = None) -> None:
    gamma = gamma.detach().to("cpu", torch.float32).contiguous()
    blocks = torch.from_numpy(block_table(layouts, k_begins))
    _C.reconstruct_(views, cut.table, blocks, gamma, list(seeds), float(alpha), distribution)


def generate_sum(seed: int, K: int, d: int, distribution: str, device) -> float:
    return _C.generate_sum(seed, K, d, distribution)
