"""Fused seeded projection: gamma[c_l + k] = sum_j v_{l,k}[j] * x_l[j] over ragged blocks.

One launch per (dtype, alignment) group covers every block of a layout. A work item
is one tile of one segment and a group of up to K_GROUP bases; it loads its x tile
once, regenerates each basis tile in registers and reduces it against x once per basis
into a partial sum. A second kernel adds each basis's partial sums in item order.
Nothing is atomic, so every call returns the same bits.

Work rows (one per segment and basis group, built per call with numpy):
``(segment, first tile, first item, first basis, first partial row)``. Partial rows are
numbered block by block, group by group, then by (segment, tile) item within the block,
so each (block, group) owns one contiguous run of rows whatever the launch grouping.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...layout import BlockLayout, SegmentTable, block_table
from . import _launch
from ._launch import (
    DIST_CODE,
    DTYPES,
    CallBuffer,
    Launch,
    anchor,
    find_row,
    item_starts,
    launch_groups,
    run,
    seed_words,
    segment_columns,
)
from ._rng import gaussian4, hand_over, rademacher_words, signed_by_bit, signed_by_lane_bit, uint32_key
from ._tile import bit_tile, call_tile, lane_tile, split4, tile_span

# Measured on an H100 (triton 3.6, benchmarks/tune_triton.py, benchmarks/RESULTS.md):
# 16 bases per work item reuse each loaded x tile twice as often as 8 (+3-12%), and a
# 2048-element tile beats 1024 for gaussian (+9%) and 4096 for Rademacher, whose 16
# calls then fit one warp with the x tile in registers (+34% over 4096 on two warps).
# The partial-sum table stays at 1/128 of the input per basis group, as before.
K_GROUP = 16
SHAPES = {"gaussian": _launch.TileShape(2048, num_warps=4),
          "rademacher": _launch.TileShape(2048, num_warps=1)}
# Rademacher project on aligned segments keeps one Philox call per lane (_tile.lane_tile)
# instead of handing every basis's words to the lanes that hold x (the unaligned path):
# in the compiled sm_90 loop that drops the per-basis shared-memory exchange and its
# barriers and 14% of the instructions (benchmarks/RESULTS.md; not yet timed on a GPU, so
# benchmarks/tune_triton.py times both). The calls' axis must be the one Triton gives the
# lanes, which triton 3.6 chooses leading and 3.7 on trailing (read off the layouts).
LANE_PER_CALL = True
CALLS_FIRST = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7)
# Rows of partial sums summed per step of the second kernel, and its warps.
SUM_ROWS = 64
SUM_WARPS = 4
ROW = tl.constexpr(5)  # columns of a work row


@triton.jit
def _load_f32(ptrs_mask):
    ptrs, mask = ptrs_mask
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["call_ptr", "seg_ptr", "partial_ptr", "rows_at", "n_rows", "seeds_at", "blocks_at"])
def _project_kernel(call_ptr, seg_ptr, anchor_ptr, partial_ptr, rows_at, n_rows, seeds_at, blocks_at,
                    ALIGNED: tl.constexpr, DIST: tl.constexpr, TILE: tl.constexpr, K_GROUP: tl.constexpr,
                    CALLS_FIRST: tl.constexpr):
    item = tl.program_id(0).to(tl.int64)
    r = find_row(call_ptr + rows_at + 2, ROW, n_rows, item)
    row = call_ptr + rows_at + r * ROW
    seg = tl.load(row)
    within = item - tl.load(row + 2)
    tile_j = (tl.load(row + 1) + within) * TILE
    k_start = tl.load(row + 3)
    out = partial_ptr + (tl.load(row + 4) + within) * K_GROUP
    tensor = tl.load(seg_ptr + seg * 5)
    start = tl.load(seg_ptr + seg * 5 + 1)
    n = tl.load(seg_ptr + seg * 5 + 2)
    blk = tl.load(seg_ptr + seg * 5 + 3)
    j0 = tl.load(seg_ptr + seg * 5 + 4)
    tile_ptr, lo, hi = tile_span(anchor_ptr, tl.load(call_ptr + tensor) + start, j0, n, tile_j, TILE, ALIGNED)
    kc = tl.minimum(tl.load(call_ptr + blocks_at + blk * 4), k_start + K_GROUP) - k_start
    block = tl.load(call_ptr + blocks_at + blk * 4 + 1).to(tl.uint32)
    key0, key1 = uint32_key(call_ptr + seeds_at)
    if DIST == 0:
        call = tile_j // 4 + tl.arange(0, TILE // 4)
        x0, x1, x2, x3 = split4(_load_f32(call_tile(tile_ptr, lo, hi, TILE // 4, ALIGNED)))
        for i in range(0, kc):
            z0, z1, z2, z3 = gaussian4(call, (k_start + i).to(tl.uint32), block, key0, key1)
            tl.store(out + i, tl.sum(((z0 * x0 + z1 * x1) + z2 * x2) + z3 * x3))
    elif ALIGNED:
        call = tile_j // 128 + tl.arange(0, TILE // 128)
        if CALLS_FIRST:
            bit = tl.arange(0, 4)[None, :, None] + (tl.arange(0, 8) * 4)[None, None, :]
        else:
            bit = (tl.arange(0, 8) * 4)[:, None, None] + tl.arange(0, 4)[None, :, None]
        x0 = _load_f32(lane_tile(tile_ptr, lo, hi, 0, TILE // 128, CALLS_FIRST))
        x1 = _load_f32(lane_tile(tile_ptr, lo, hi, 1, TILE // 128, CALLS_FIRST))
        x2 = _load_f32(lane_tile(tile_ptr, lo, hi, 2, TILE // 128, CALLS_FIRST))
        x3 = _load_f32(lane_tile(tile_ptr, lo, hi, 3, TILE // 128, CALLS_FIRST))
        for i in range(0, kc):
            w0, w1, w2, w3 = rademacher_words(call, (k_start + i).to(tl.uint32), block, key0, key1)
            signed = signed_by_lane_bit(x0, w0, bit, CALLS_FIRST) + signed_by_lane_bit(x1, w1, bit, CALLS_FIRST)
            signed = (signed + signed_by_lane_bit(x2, w2, bit, CALLS_FIRST)) + signed_by_lane_bit(x3, w3, bit,
                                                                                                  CALLS_FIRST)
            tl.store(out + i, tl.sum(signed))
    else:
        call = tile_j // 128 + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        x0 = _load_f32(bit_tile(tile_ptr, lo, hi, 0, TILE // 128))
        x1 = _load_f32(bit_tile(tile_ptr, lo, hi, 1, TILE // 128))
        x2 = _load_f32(bit_tile(tile_ptr, lo, hi, 2, TILE // 128))
        x3 = _load_f32(bit_tile(tile_ptr, lo, hi, 3, TILE // 128))
        for i in range(0, kc):
            w0, w1, w2, w3 = rademacher_words(call, (k_start + i).to(tl.uint32), block, key0, key1)
            signed = signed_by_bit(x0, hand_over(w0), bit) + signed_by_bit(x1, hand_over(w1), bit)
            signed = (signed + signed_by_bit(x2, hand_over(w2), bit)) + signed_by_bit(x3, hand_over(w3), bit)
            tl.store(out + i, tl.sum(signed))


@triton.jit(do_not_specialize=["call_ptr", "partial_ptr", "gamma_ptr", "runs_at"])
def _sum_runs_kernel(call_ptr, partial_ptr, gamma_ptr, runs_at, K_GROUP: tl.constexpr, SUM_ROWS: tl.constexpr):
    run_row = call_ptr + runs_at + tl.program_id(0).to(tl.int64) * 4
    row_begin = tl.load(run_row)
    row_end = tl.load(run_row + 1)
    coef = tl.load(run_row + 2)
    count = tl.load(run_row + 3)
    cols = tl.arange(0, K_GROUP)
    acc = tl.zeros([K_GROUP], dtype=tl.float32)
    for r in range(row_begin, row_end, SUM_ROWS):
        rows = r + tl.arange(0, SUM_ROWS)
        part = tl.load(partial_ptr + rows[:, None] * K_GROUP + cols[None, :], mask=(rows < row_end)[:, None], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(gamma_ptr + coef + cols, acc, mask=cols < count)


def prepare(views: list[torch.Tensor], cut: SegmentTable, layout: BlockLayout, seed: int, distribution: str,
            device: torch.device | None = None) -> tuple[list[Launch], torch.Tensor]:
    """The launches of one call (host work only) and the gamma they fill. ``device`` is
    where tables and outputs go: the views' device, except for the launch benchmark
    (meta views, CPU tables)."""
    device = views[0].device if device is None else device
    shape = SHAPES[distribution]
    cols = segment_columns(cut, len(layout.sizes), shape.tile, device)
    groups, offsets = launch_groups(views, cols, distribution == "gaussian" or LANE_PER_CALL, device)
    counts = np.asarray(layout.counts, dtype=np.int64)
    n_groups = (counts + K_GROUP - 1) // K_GROUP
    block_rows = n_groups * cols.block_items  # partial rows per block
    block_row0 = item_starts(block_rows)
    buf = CallBuffer()
    buf.add(offsets)
    seeds_at = buf.add(seed_words([seed]))
    blocks_at = buf.add(block_table([layout]))
    work = []
    for code in np.unique(groups):
        segs = np.flatnonzero((groups == code) & (n_groups[cols.block] > 0))
        if len(segs) == 0:
            continue
        seg, group = _repeat(segs, n_groups[cols.block[segs]])
        blk = cols.block[seg]
        rows = np.stack([seg, cols.first_tile[seg], item_starts(cols.n_tiles[seg]), group * K_GROUP,
                         block_row0[blk] + group * cols.block_items[blk] + cols.block_item[seg]], axis=1)
        work.append((int(code), buf.add(rows), len(rows), int(cols.n_tiles[seg].sum())))
    blk, group = _repeat(np.flatnonzero(n_groups), n_groups[n_groups > 0])
    first = block_row0[blk] + group * cols.block_items[blk]
    coef = np.asarray(layout.coef_offsets, dtype=np.int64)[blk] + group * K_GROUP
    runs_at = buf.add(np.stack([first, first + cols.block_items[blk], coef,
                                np.minimum(K_GROUP, counts[blk] - group * K_GROUP)], axis=1))
    table = buf.to(device)
    gamma = torch.zeros(layout.total_count, dtype=torch.float32, device=device)
    partial = torch.empty((int(block_rows.sum()), K_GROUP), dtype=torch.float32, device=device)
    launches = [
        Launch(_project_kernel, (n_items,),
               (table, cols.device_table, anchor(DTYPES[code // 2], device), partial, rows_at, n_rows, seeds_at,
                blocks_at),
               dict(ALIGNED=bool(code % 2), DIST=DIST_CODE[distribution], TILE=shape.tile, K_GROUP=K_GROUP,
                    CALLS_FIRST=CALLS_FIRST),
               shape.num_warps)
        for code, rows_at, n_rows, n_items in work
    ]
    if len(blk):
        launches.append(Launch(_sum_runs_kernel, (len(blk),), (table, partial, gamma, runs_at),
                               dict(K_GROUP=K_GROUP, SUM_ROWS=SUM_ROWS), SUM_WARPS))
    return launches, gamma


def _repeat(values: np.ndarray, reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value repeated reps times, with its repetition index 0..reps-1."""
    within = np.arange(reps.sum()) - np.repeat(item_starts(reps), reps)
    return np.repeat(values, reps), within


def project_segments(views: list[torch.Tensor], cut: SegmentTable, layout: BlockLayout, seed: int,
                     distribution: str) -> torch.Tensor:
    """gamma (float32, length layout.total_count) for checked inputs; see functional.project_blocks."""
    launches, gamma = prepare(views, cut, layout, seed, distribution)
    run(launches)
    return gamma
