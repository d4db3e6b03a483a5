"""Fused seeded reconstruction: out_l[j] += alpha * sum_k gamma[c_l + k] * v_{l, b_l + k}[j].

One launch per (dtype, alignment) group covers every block of a layout, in place,
whatever the number of bases or seeds. A program is one tile of one segment: it finds
its segment by a binary search over the call's work rows (one per segment: segment,
first tile, first item), regenerates its block's basis tiles one after another in
registers and accumulates acc = acc + gamma_k * v_k in float32, seeds in order and k
ascending, then writes round(out + alpha * acc) in the output's dtype. That order is
part of the contract, so every backend writes the same bits. Perturb is the same
kernel with one basis per block and gamma = 1.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...layout import BlockLayout, SegmentTable, block_table
from ._launch import (
    DIST_CODE,
    DTYPES,
    SHAPES,
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
from ._rng import gaussian4, rademacher_words, round_float32_to, signed_by_bit, uint32_key
from ._tile import bit_tile, call_tile, join4, tile_span

ROW = tl.constexpr(3)  # columns of a work row: segment, first tile, first item


@triton.jit
def _update(ptrs, mask, acc, alpha):
    old = tl.load(ptrs, mask=mask, other=0.0)
    new = old.to(tl.float32) + alpha * acc
    tl.store(ptrs, round_float32_to(new, old.dtype), mask=mask)


@triton.jit
def _seed_block(call_ptr, seeds_at, blocks_at, n_blocks, s, blk):
    """Seed s's row for block position blk: (count, counter block id, coefficient
    offset, first basis) and the two Philox key words."""
    row = call_ptr + blocks_at + (s * n_blocks + blk) * 4
    count = tl.load(row)
    block = tl.load(row + 1).to(tl.uint32)
    coef = tl.load(row + 2)
    k_begin = tl.load(row + 3)
    key0, key1 = uint32_key(call_ptr + seeds_at + 2 * s)
    return count, block, coef, k_begin, key0, key1


@triton.jit(do_not_specialize=["call_ptr", "seg_ptr", "gamma_ptr", "alpha", "rows_at", "n_rows", "seeds_at",
                               "n_seeds", "blocks_at", "n_blocks"])
def _reconstruct_kernel(call_ptr, seg_ptr, anchor_ptr, gamma_ptr, alpha, rows_at, n_rows, seeds_at, n_seeds,
                        blocks_at, n_blocks, ALIGNED: tl.constexpr, DIST: tl.constexpr, TILE: tl.constexpr):
    item = tl.program_id(0).to(tl.int64)
    r = find_row(call_ptr + rows_at + 2, ROW, n_rows, item)
    row = call_ptr + rows_at + r * ROW
    seg = tl.load(row)
    tile_j = (tl.load(row + 1) + item - tl.load(row + 2)) * TILE
    tensor = tl.load(seg_ptr + seg * 5)
    start = tl.load(seg_ptr + seg * 5 + 1)
    n = tl.load(seg_ptr + seg * 5 + 2)
    blk = tl.load(seg_ptr + seg * 5 + 3)
    j0 = tl.load(seg_ptr + seg * 5 + 4)
    tile_ptr, lo, hi = tile_span(anchor_ptr, tl.load(call_ptr + tensor) + start, j0, n, tile_j, TILE, ALIGNED)
    terms = tl.zeros([], dtype=tl.int64)
    for s in range(0, n_seeds):
        terms += tl.load(call_ptr + blocks_at + (s * n_blocks + blk) * 4)
    if terms > 0:  # a block no seed has bases for is left untouched, as on every backend
        if DIST == 0:
            call = tile_j // 4 + tl.arange(0, TILE // 4)
            acc0 = tl.zeros([TILE // 4], dtype=tl.float32)
            acc1 = tl.zeros([TILE // 4], dtype=tl.float32)
            acc2 = tl.zeros([TILE // 4], dtype=tl.float32)
            acc3 = tl.zeros([TILE // 4], dtype=tl.float32)
            for s in range(0, n_seeds):
                count, block, coef, k_begin, key0, key1 = _seed_block(call_ptr, seeds_at, blocks_at, n_blocks, s, blk)
                for i in range(0, count):
                    g = tl.load(gamma_ptr + coef + i)
                    z0, z1, z2, z3 = gaussian4(call, (k_begin + i).to(tl.uint32), block, key0, key1)
                    acc0 = acc0 + g * z0
                    acc1 = acc1 + g * z1
                    acc2 = acc2 + g * z2
                    acc3 = acc3 + g * z3
            ptrs, mask = call_tile(tile_ptr, lo, hi, TILE // 4, ALIGNED)
            _update(ptrs, mask, join4(acc0, acc1, acc2, acc3), alpha)
        else:
            call = tile_j // 128 + tl.arange(0, TILE // 128)
            bit = tl.arange(0, 32)
            acc0 = tl.zeros([32, TILE // 128], dtype=tl.float32)
            acc1 = tl.zeros([32, TILE // 128], dtype=tl.float32)
            acc2 = tl.zeros([32, TILE // 128], dtype=tl.float32)
            acc3 = tl.zeros([32, TILE // 128], dtype=tl.float32)
            for s in range(0, n_seeds):
                count, block, coef, k_begin, key0, key1 = _seed_block(call_ptr, seeds_at, blocks_at, n_blocks, s, blk)
                for i in range(0, count):
                    g = tl.load(gamma_ptr + coef + i)
                    w0, w1, w2, w3 = rademacher_words(call, (k_begin + i).to(tl.uint32), block, key0, key1)
                    # g * (+-1) is exactly +-g
                    acc0 = acc0 + signed_by_bit(g, w0, bit)
                    acc1 = acc1 + signed_by_bit(g, w1, bit)
                    acc2 = acc2 + signed_by_bit(g, w2, bit)
                    acc3 = acc3 + signed_by_bit(g, w3, bit)
            ptrs, mask = bit_tile(tile_ptr, lo, hi, 0, TILE // 128)
            _update(ptrs, mask, acc0, alpha)
            ptrs, mask = bit_tile(tile_ptr, lo, hi, 1, TILE // 128)
            _update(ptrs, mask, acc1, alpha)
            ptrs, mask = bit_tile(tile_ptr, lo, hi, 2, TILE // 128)
            _update(ptrs, mask, acc2, alpha)
            ptrs, mask = bit_tile(tile_ptr, lo, hi, 3, TILE // 128)
            _update(ptrs, mask, acc3, alpha)


def prepare(views: list[torch.Tensor], cut: SegmentTable, layouts: list[BlockLayout], gamma: torch.Tensor,
            seeds: list[int], alpha: float, distribution: str, k_begins=None,
            device: torch.device | None = None) -> list[Launch]:
    """The launches of one call (host work only). ``device`` is where the tables go:
    the views' device, except for the launch benchmark (meta views, CPU tables)."""
    device = views[0].device if device is None else device
    shape = SHAPES[distribution]
    n_blocks = len(layouts[0].sizes)
    cols = segment_columns(cut, n_blocks, shape.tile, device)
    groups, offsets = launch_groups(views, cols, distribution == "gaussian", device)
    buf = CallBuffer()
    buf.add(offsets)
    seeds_at = buf.add(seed_words(seeds))
    blocks_at = buf.add(block_table(layouts, k_begins))
    plan = []
    for code in np.unique(groups):
        segs = np.flatnonzero(groups == code)
        rows = np.stack([segs, cols.first_tile[segs], item_starts(cols.n_tiles[segs])], axis=1)
        plan.append((int(code), buf.add(rows), len(segs), int(cols.n_tiles[segs].sum())))
    table = buf.to(device)
    return [
        Launch(_reconstruct_kernel, (n_items,),
               (table, cols.device_table, anchor(DTYPES[code // 2], device), gamma, alpha, rows_at, n_rows, seeds_at,
                len(seeds), blocks_at, n_blocks),
               dict(ALIGNED=bool(code % 2), DIST=DIST_CODE[distribution], TILE=shape.tile), shape.num_warps)
        for code, rows_at, n_rows, n_items in plan
    ]


def reconstruct_seeds(views: list[torch.Tensor], cut: SegmentTable, layouts: list[BlockLayout], gamma: torch.Tensor,
                      seeds: list[int], alpha: float, distribution: str, k_begins=None) -> None:
    """One pass for several seeds: layouts[g] under seeds[g], coefficient offsets into
    ``gamma``; every element accumulates seed by seed, k ascending, and is rounded once."""
    run(prepare(views, cut, layouts, gamma, seeds, alpha, distribution, k_begins))
