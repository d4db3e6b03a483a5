"""Work tables for the ragged Triton kernels.

A tile is TILE consecutive block elements starting at a multiple of TILE, clipped to
one segment; TILE is a multiple of every distribution's elements-per-Philox-call, so
a tile never splits a call. Tables are int64 tensors on the kernels' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import BlockLayout, Segment

DIST_CODE = {"gaussian": 0, "rademacher": 1}


@dataclass
class SegmentTables:
    """Per-segment columns, ordered as the segments list.

    ``ptr`` data address of the segment's first element, ``j0`` its first block element,
    ``n`` its length, ``block`` its block's position in the layout.
    """

    ptr: torch.Tensor
    j0: torch.Tensor
    n: torch.Tensor
    block: torch.Tensor
    dtype_of: list[torch.dtype]
    tile_count: np.ndarray
    first_tile: np.ndarray


def segment_tables(views: list[torch.Tensor], segments: list[Segment], tile: int) -> SegmentTables:
    device = views[0].device
    ptr = [views[s.tensor_index].data_ptr() + s.start * views[s.tensor_index].element_size() for s in segments]
    j0 = np.array([s.j0 for s in segments], dtype=np.int64)
    n = np.array([s.n for s in segments], dtype=np.int64)
    first_tile = j0 // tile
    tile_count = (j0 + n + tile - 1) // tile - first_tile

    def col(values):
        return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device)

    return SegmentTables(
        ptr=col(ptr),
        j0=col(j0),
        n=col(n),
        block=col([s.block for s in segments]),
        dtype_of=[views[s.tensor_index].dtype for s in segments],
        tile_count=tile_count,
        first_tile=first_tile,
    )


def block_tables(layout: BlockLayout, device, k_begin=None) -> dict[str, torch.Tensor]:
    """Per-block columns: counter word, basis count, coefficient offset, first basis."""
    L = len(layout.sizes)
    k_begin = [0] * L if k_begin is None else k_begin
    return {
        name: torch.tensor(values, dtype=torch.int64, device=device)
        for name, values in (
            ("block_id", layout.block_ids),
            ("count", layout.counts),
            ("coef_offset", layout.coef_offsets),
            ("k_begin", k_begin),
        )
    }


def tile_items(tables: SegmentTables, segment_ids: np.ndarray, tile: int) -> np.ndarray:
    """(segment, tile start) rows for every tile of the given segments, in order."""
    counts = tables.tile_count[segment_ids]
    seg = np.repeat(segment_ids, counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.repeat(tables.first_tile[segment_ids], counts) + within) * tile
    return np.stack([seg, start], axis=1).astype(np.int64)
