"""Materialise basis rows V[k, i] = v_{block, k_begin + k}[offset + i] (tests, debugging).

Every other op regenerates these values in registers; this one writes them out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rng import gaussian4, rademacher_words, signed_by_bit
from ._tables import DIST_CODE

# Elements per program: a multiple of 128 (a Rademacher Philox call).
TILE = 1024


@triton.jit
def _store_lane(out_row, i, n, values):
    tl.store(out_row + i, values, mask=(i >= 0) & (i < n))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "block", "k_begin"])
def _basis_kernel(out_ptr, n, offset, n_tiles, block, k_begin, seed_lo, seed_hi,
                  TILE: tl.constexpr, DIST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles
    tile_j = (offset // TILE + pid % n_tiles) * TILE
    out_row = out_ptr + row * n
    k = (k_begin + row).to(tl.uint32)
    blk = block.to(tl.uint32)
    key0 = seed_lo.to(tl.uint32)
    key1 = seed_hi.to(tl.uint32)
    if DIST == 0:
        call = tile_j // 4 + tl.arange(0, TILE // 4)
        z0, z1, z2, z3 = gaussian4(call, k, blk, key0, key1)
        i0 = call * 4 - offset
        _store_lane(out_row, i0, n, z0)
        _store_lane(out_row, i0 + 1, n, z1)
        _store_lane(out_row, i0 + 2, n, z2)
        _store_lane(out_row, i0 + 3, n, z3)
    else:
        call = tile_j // 128 + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        ones = tl.full([TILE // 128, 32], 1.0, dtype=tl.float32)
        w0, w1, w2, w3 = rademacher_words(call, k, blk, key0, key1)
        i0 = (call * 128 - offset)[:, None] + bit[None, :]
        _store_lane(out_row, i0, n, signed_by_bit(ones, w0, bit))
        _store_lane(out_row, i0 + 32, n, signed_by_bit(ones, w1, bit))
        _store_lane(out_row, i0 + 64, n, signed_by_bit(ones, w2, bit))
        _store_lane(out_row, i0 + 96, n, signed_by_bit(ones, w3, bit))


def basis_rows(seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
               device) -> torch.Tensor:
    """float32 (K, d) on ``device`` for checked arguments; see functional.basis."""
    out = torch.empty((K, d), dtype=torch.float32, device=device)
    n_tiles = (offset + d + TILE - 1) // TILE - offset // TILE
    _basis_kernel[(K * n_tiles,)](
        out, d, offset, n_tiles, block, k_begin, seed & 0xFFFFFFFF, seed >> 32,
        TILE=TILE, DIST=DIST_CODE[distribution], enable_fp_fusion=False,
    )
    return out
