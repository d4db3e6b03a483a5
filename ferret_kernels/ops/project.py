"""Fused seeded projection: gamma[c_l + k] = sum_j v_{l,k}[j] * x_l[j] over ragged blocks.

One launch covers every block of a layout. A work item is one tile of one segment and
a group of up to K_GROUP bases; it loads its x tile once, regenerates each basis tile
in registers and writes one partial sum per basis. A second kernel adds each basis's
partial sums in item order. Nothing is atomic, so every call returns the same bits.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..layout import BlockLayout, Segment
from ._rng import gaussian4, rademacher_words, signed_by_bit
from ._tables import DIST_CODE, block_tables, segment_tables, tile_items

# Elements per tile: a multiple of 128 (a Rademacher Philox call) and large enough that
# the per-item table reads and the x tile load are small next to the generation work.
TILE = 1024
# Bases per work item: each one reuses the loaded x tile; 8 keeps the partial-sum table
# at 1/128 of the input size while leaving many items to spread over the GPU.
K_GROUP = 8
# Rows of partial sums summed per step of the second kernel.
SUM_ROWS = 64

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _load_f32(base, i, n):
    return tl.load(base + i, mask=(i >= 0) & (i < n), other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _project_kernel(
    items_ptr, seg_ptr_ptr, seg_j0_ptr, seg_n_ptr, seg_block_ptr, blk_id_ptr, blk_count_ptr,
    partial_ptr, seed_lo, seed_hi,
    X_DTYPE: tl.constexpr, TILE: tl.constexpr, K_GROUP: tl.constexpr, DIST: tl.constexpr,
):
    item = tl.program_id(0)
    seg = tl.load(items_ptr + item * 4)
    tile_j = tl.load(items_ptr + item * 4 + 1)
    k_start = tl.load(items_ptr + item * 4 + 2)
    row = tl.load(items_ptr + item * 4 + 3)
    x_base = tl.load(seg_ptr_ptr + seg).to(tl.pointer_type(X_DTYPE))
    j0 = tl.load(seg_j0_ptr + seg)
    n = tl.load(seg_n_ptr + seg)
    blk = tl.load(seg_block_ptr + seg)
    block = tl.load(blk_id_ptr + blk).to(tl.uint32)
    k_end = tl.minimum(tl.load(blk_count_ptr + blk), k_start + K_GROUP)
    key0 = seed_lo.to(tl.uint32)
    key1 = seed_hi.to(tl.uint32)
    if DIST == 0:
        call = tile_j // 4 + tl.arange(0, TILE // 4)
        i0 = call * 4 - j0
        x0 = _load_f32(x_base, i0, n)
        x1 = _load_f32(x_base, i0 + 1, n)
        x2 = _load_f32(x_base, i0 + 2, n)
        x3 = _load_f32(x_base, i0 + 3, n)
        for i in range(0, k_end - k_start):
            z0, z1, z2, z3 = gaussian4(call, (k_start + i).to(tl.uint32), block, key0, key1)
            total = tl.sum(z0 * x0) + tl.sum(z1 * x1) + tl.sum(z2 * x2) + tl.sum(z3 * x3)
            tl.store(partial_ptr + row * K_GROUP + i, total)
    else:
        call = tile_j // 128 + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        i0 = (call * 128 - j0)[:, None] + bit[None, :]
        x0 = _load_f32(x_base, i0, n)
        x1 = _load_f32(x_base, i0 + 32, n)
        x2 = _load_f32(x_base, i0 + 64, n)
        x3 = _load_f32(x_base, i0 + 96, n)
        for i in range(0, k_end - k_start):
            w0, w1, w2, w3 = rademacher_words(call, (k_start + i).to(tl.uint32), block, key0, key1)
            total = tl.sum(signed_by_bit(x0, w0, bit)) + tl.sum(signed_by_bit(x1, w1, bit))
            total += tl.sum(signed_by_bit(x2, w2, bit)) + tl.sum(signed_by_bit(x3, w3, bit))
            tl.store(partial_ptr + row * K_GROUP + i, total)


@triton.jit
def _sum_runs_kernel(partial_ptr, runs_ptr, gamma_ptr, K_GROUP: tl.constexpr, SUM_ROWS: tl.constexpr):
    run = tl.program_id(0)
    row_begin = tl.load(runs_ptr + run * 4)
    row_end = tl.load(runs_ptr + run * 4 + 1)
    coef = tl.load(runs_ptr + run * 4 + 2)
    count = tl.load(runs_ptr + run * 4 + 3)
    cols = tl.arange(0, K_GROUP)
    acc = tl.zeros([K_GROUP], dtype=tl.float32)
    for r in range(row_begin, row_end, SUM_ROWS):
        rows = r + tl.arange(0, SUM_ROWS)
        part = tl.load(partial_ptr + rows[:, None] * K_GROUP + cols[None, :], mask=(rows < row_end)[:, None], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(gamma_ptr + coef + cols, acc, mask=cols < count)


def _work_items(layout: BlockLayout, segments: list[Segment], tables) -> tuple[np.ndarray, np.ndarray]:
    """Items (segment, tile start, first basis, partial row), ordered by block, basis
    group, segment, tile; and runs (first row, end row, first coefficient, count)."""
    by_block: dict[int, list[int]] = {}
    for i, s in enumerate(segments):
        by_block.setdefault(s.block, []).append(i)
    items, runs, row = [], [], 0
    for blk, seg_ids in by_block.items():
        count = layout.counts[blk]
        if count == 0:
            continue
        tiles = tile_items(tables, np.asarray(seg_ids, dtype=np.int64), TILE)
        n_tiles = len(tiles)
        for k_start in range(0, count, K_GROUP):
            rows = np.arange(row, row + n_tiles, dtype=np.int64)
            k_col = np.full(n_tiles, k_start, dtype=np.int64)
            items.append(np.column_stack([tiles, k_col, rows]))
            runs.append((row, row + n_tiles, layout.coef_offsets[blk] + k_start, min(K_GROUP, count - k_start)))
            row += n_tiles
    items_arr = np.concatenate(items) if items else np.zeros((0, 4), dtype=np.int64)
    return items_arr, np.asarray(runs, dtype=np.int64).reshape(-1, 4)


def project_segments(views: list[torch.Tensor], segments: list[Segment], layout: BlockLayout, seed: int,
                     distribution: str) -> torch.Tensor:
    """gamma (float32, length layout.total_count) for checked inputs; see functional.project_blocks."""
    device = views[0].device
    gamma = torch.zeros(layout.total_count, dtype=torch.float32, device=device)
    tables = segment_tables(views, segments, TILE)
    items, runs = _work_items(layout, segments, tables)
    if len(items) == 0:
        return gamma
    blocks = block_tables(layout, device)
    partial = torch.empty((len(items), K_GROUP), dtype=torch.float32, device=device)
    seg_dtype = np.array([str(d) for d in tables.dtype_of])[items[:, 0]]
    for dtype in set(tables.dtype_of):
        subset = torch.as_tensor(items[seg_dtype == str(dtype)]).to(device)
        if len(subset) == 0:
            continue
        _project_kernel[(len(subset),)](
            subset, tables.ptr, tables.j0, tables.n, tables.block, blocks["block_id"], blocks["count"],
            partial, seed & 0xFFFFFFFF, seed >> 32,
            X_DTYPE=_TL_DTYPE[dtype], TILE=TILE, K_GROUP=K_GROUP, DIST=DIST_CODE[distribution],
            enable_fp_fusion=False,
        )
    runs_t = torch.as_tensor(runs).to(device)
    _sum_runs_kernel[(len(runs),)](partial, runs_t, gamma, K_GROUP=K_GROUP, SUM_ROWS=SUM_ROWS)
    return gamma
