"""Fused seeded reconstruction: out_l[j] += alpha * sum_k gamma[c_l + k] * v_{l, b_l + k}[j].

One launch covers every block of a layout, in place, whatever the number of bases.
A work item is one tile of one segment; it regenerates its block's basis tiles one
after another in registers and accumulates acc = acc + gamma_k * v_k in float32 for
k ascending, then writes round(out + alpha * acc) in the output's dtype. That order is
part of the contract, so every backend writes the same bits.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..layout import BlockLayout, Segment
from ._rng import gaussian4, rademacher_words, round_float32_to, signed_by_bit
from ._tables import DIST_CODE, block_tables, segment_tables, tile_items

# Elements per tile: a multiple of 128 (a Rademacher Philox call); 1024 gives every
# GPU core several tiles once a block passes ~10^8 elements while keeping the four
# float32 accumulators in registers.
TILE = 1024

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _update_lane(base, i, n, acc, alpha):
    mask = (i >= 0) & (i < n)
    old = tl.load(base + i, mask=mask, other=0.0)
    new = old.to(tl.float32) + alpha * acc
    tl.store(base + i, round_float32_to(new, old.dtype), mask=mask)


@triton.jit
def _seed_term(s, n_blocks, blk, blk_id_ptr, blk_count_ptr, blk_coef_ptr, blk_kbegin_ptr, gamma_ptr, seed_lo_ptr,
               seed_hi_ptr):
    """Seed s's row for block position blk: counter block id, coefficient pointer, first
    basis, basis count and the two Philox key words."""
    row = s * n_blocks + blk
    block = tl.load(blk_id_ptr + row).to(tl.uint32)
    coef = gamma_ptr + tl.load(blk_coef_ptr + row)
    k_begin = tl.load(blk_kbegin_ptr + row)
    count = tl.load(blk_count_ptr + row)
    key0 = tl.load(seed_lo_ptr + s).to(tl.uint32)
    key1 = tl.load(seed_hi_ptr + s).to(tl.uint32)
    return block, coef, k_begin, count, key0, key1


@triton.jit(do_not_specialize=["alpha", "n_seeds", "n_blocks"])
def _reconstruct_kernel(
    items_ptr, seg_ptr_ptr, seg_j0_ptr, seg_n_ptr, seg_block_ptr, blk_id_ptr, blk_count_ptr,
    blk_coef_ptr, blk_kbegin_ptr, gamma_ptr, alpha, seed_lo_ptr, seed_hi_ptr, n_seeds, n_blocks,
    OUT_DTYPE: tl.constexpr, TILE: tl.constexpr, DIST: tl.constexpr,
):
    item = tl.program_id(0)
    seg = tl.load(items_ptr + item * 2)
    tile_j = tl.load(items_ptr + item * 2 + 1)
    base = tl.load(seg_ptr_ptr + seg).to(tl.pointer_type(OUT_DTYPE))
    j0 = tl.load(seg_j0_ptr + seg)
    n = tl.load(seg_n_ptr + seg)
    blk = tl.load(seg_block_ptr + seg)
    if DIST == 0:
        call = tile_j // 4 + tl.arange(0, TILE // 4)
        acc0 = tl.zeros([TILE // 4], dtype=tl.float32)
        acc1 = tl.zeros([TILE // 4], dtype=tl.float32)
        acc2 = tl.zeros([TILE // 4], dtype=tl.float32)
        acc3 = tl.zeros([TILE // 4], dtype=tl.float32)
        for s in range(0, n_seeds):
            block, coef, k_begin, count, key0, key1 = _seed_term(
                s, n_blocks, blk, blk_id_ptr, blk_count_ptr, blk_coef_ptr, blk_kbegin_ptr, gamma_ptr, seed_lo_ptr,
                seed_hi_ptr)
            for i in range(0, count):
                g = tl.load(coef + i)
                z0, z1, z2, z3 = gaussian4(call, (k_begin + i).to(tl.uint32), block, key0, key1)
                acc0 = acc0 + g * z0
                acc1 = acc1 + g * z1
                acc2 = acc2 + g * z2
                acc3 = acc3 + g * z3
        i0 = call * 4 - j0
        _update_lane(base, i0, n, acc0, alpha)
        _update_lane(base, i0 + 1, n, acc1, alpha)
        _update_lane(base, i0 + 2, n, acc2, alpha)
        _update_lane(base, i0 + 3, n, acc3, alpha)
    else:
        call = tile_j // 128 + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        acc0 = tl.zeros([TILE // 128, 32], dtype=tl.float32)
        acc1 = tl.zeros([TILE // 128, 32], dtype=tl.float32)
        acc2 = tl.zeros([TILE // 128, 32], dtype=tl.float32)
        acc3 = tl.zeros([TILE // 128, 32], dtype=tl.float32)
        ones = tl.full([TILE // 128, 32], 1.0, dtype=tl.float32)
        for s in range(0, n_seeds):
            block, coef, k_begin, count, key0, key1 = _seed_term(
                s, n_blocks, blk, blk_id_ptr, blk_count_ptr, blk_coef_ptr, blk_kbegin_ptr, gamma_ptr, seed_lo_ptr,
                seed_hi_ptr)
            for i in range(0, count):
                g = tl.load(coef + i)
                w0, w1, w2, w3 = rademacher_words(call, (k_begin + i).to(tl.uint32), block, key0, key1)
                acc0 = acc0 + g * signed_by_bit(ones, w0, bit)
                acc1 = acc1 + g * signed_by_bit(ones, w1, bit)
                acc2 = acc2 + g * signed_by_bit(ones, w2, bit)
                acc3 = acc3 + g * signed_by_bit(ones, w3, bit)
        i0 = (call * 128 - j0)[:, None] + bit[None, :]
        _update_lane(base, i0, n, acc0, alpha)
        _update_lane(base, i0 + 32, n, acc1, alpha)
        _update_lane(base, i0 + 64, n, acc2, alpha)
        _update_lane(base, i0 + 96, n, acc3, alpha)


def reconstruct_seeds(views: list[torch.Tensor], segments: list[Segment], layouts: list[BlockLayout],
                      gamma: torch.Tensor, seeds: list[int], alpha: float, distribution: str,
                      k_begins: list[list[int] | None] | None = None) -> None:
    """One launch for several seeds: layouts[g] under seeds[g], coefficient offsets into
    ``gamma``; every element accumulates seed by seed, k ascending, and is rounded once."""
    device = views[0].device
    tables = segment_tables(views, segments, TILE)
    k_begins = k_begins or [None] * len(layouts)
    per_seed = [block_tables(lay, device, kb) for lay, kb in zip(layouts, k_begins, strict=True)]
    blocks = {name: torch.cat([t[name] for t in per_seed]) for name in per_seed[0]}
    active = np.array([i for i, s in enumerate(segments) if any(lay.counts[s.block] > 0 for lay in layouts)],
                      dtype=np.int64)
    if len(active) == 0:
        return
    seed_lo = torch.tensor([s & 0xFFFFFFFF for s in seeds], dtype=torch.int64, device=device)
    seed_hi = torch.tensor([s >> 32 for s in seeds], dtype=torch.int64, device=device)
    items = tile_items(tables, active, TILE)
    seg_dtype = np.array([str(d) for d in tables.dtype_of])[items[:, 0]]
    for dtype in set(tables.dtype_of):
        subset = torch.as_tensor(np.ascontiguousarray(items[seg_dtype == str(dtype)])).to(device)
        if len(subset) == 0:
            continue
        _reconstruct_kernel[(len(subset),)](
            subset, tables.ptr, tables.j0, tables.n, tables.block, blocks["block_id"], blocks["count"],
            blocks["coef_offset"], blocks["k_begin"], gamma, alpha, seed_lo, seed_hi, len(seeds),
            len(layouts[0].sizes), OUT_DTYPE=_TL_DTYPE[dtype], TILE=TILE, DIST=DIST_CODE[distribution],
            enable_fp_fusion=False,
        )
