"""The C++ CPU backend: ops of ``reference.py`` on the compiled ``ferret_kernels._C``.

Same signatures and semantics as the torch backend, so ``backends.module("cpu")`` can
stand in for it. Each op is one C++ call covering every block of the layout: segments
and blocks go over as two small int64 tables, rows (tensor_index, start, n, block, j0)
and (count, block_id, coef_offset, k_begin) (the column order is fixed in
csrc/ferret_cpu.h), and the C++ side checks them before touching memory. Results are
bit-identical to the torch backend for ``basis_rows`` and the reconstruct family;
``project_segments`` is deterministic (the same bits for any thread count) and
accumulates in float32.
"""

from __future__ import annotations

import torch

from . import _C
from .layout import BlockLayout, Segment


def _segment_table(segments: list[Segment]) -> torch.Tensor:
    rows = [(s.tensor_index, s.start, s.n, s.block, s.j0) for s in segments]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), _C.SEGMENT_COLUMNS)


def _block_table(layout: BlockLayout, k_begin: list[int] | None) -> torch.Tensor:
    first = [0] * len(layout.counts) if k_begin is None else list(k_begin)
    if len(first) != len(layout.counts):
        raise ValueError(f"k_begin has {len(first)} entries but the layout has {len(layout.counts)} blocks")
    rows = list(zip(layout.counts, layout.block_ids, layout.coef_offsets, first, strict=True))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), _C.BLOCK_COLUMNS)


def basis_rows(seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
               device) -> torch.Tensor:
    """float32 (K, d): row k is basis k_begin + k of ``block``, elements offset..offset+d-1."""
    return _C.basis_rows(seed, K, d, block, offset, k_begin, distribution).to(device)


def project_segments(views: list[torch.Tensor], segments: list[Segment], layout: BlockLayout, seed: int,
                     distribution: str) -> torch.Tensor:
    """float32 (layout.total_count,): block l's V_l x_l at coef_offsets[l]."""
    return _C.project(views, _segment_table(segments), _block_table(layout, None), layout.total_count, seed,
                      distribution)


def reconstruct_seeds(views: list[torch.Tensor], segments: list[Segment], layouts: list[BlockLayout],
                      gamma: torch.Tensor, seeds: list[int], alpha: float, distribution: str,
                      k_begins: list[list[int] | None] | None = None) -> None:
    """In place, one pass for several seeds: layouts[g] (coefficient offsets into ``gamma``)
    under seeds[g], accumulated seed by seed into one float32 sum, rounded once."""
    gamma = gamma.detach().to("cpu", torch.float32).contiguous()
    k_begins = k_begins or [None] * len(layouts)
    blocks = torch.cat([_block_table(lay, kb) for lay, kb in zip(layouts, k_begins, strict=True)])
    _C.reconstruct_(views, _segment_table(segments), blocks, gamma, list(seeds), float(alpha), distribution)


def generate_sum(seed: int, K: int, d: int, distribution: str) -> float:
    """Sum of bases 0..K-1 of block 0 over elements 0..d-1: generation alone, no input
    read, for the benchmark's roofline (same Philox and float stages as the ops)."""
    return _C.generate_sum(seed, K, d, distribution)
