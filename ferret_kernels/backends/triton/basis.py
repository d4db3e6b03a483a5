"""Materialise basis rows V[k, i] = v_{block, k_begin + k}[offset + i] (tests, debugging).

Every other op regenerates these values in registers; this one writes them out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DIST_CODE, SHAPES, CallBuffer, Launch, run, seed_words
from ._rng import gaussian4, rademacher_words, signed_by_bit, uint32_key
from ._tile import bit_tile, call_tile, join4, tile_span


@triton.jit(do_not_specialize=["out_ptr", "call_ptr"])
def _basis_kernel(out_ptr, call_ptr, DIST: tl.constexpr, TILE: tl.constexpr):
    # call_ptr: seed words, block, k_begin, offset, d, tiles per row
    key0, key1 = uint32_key(call_ptr)
    block = tl.load(call_ptr + 2).to(tl.uint32)
    offset = tl.load(call_ptr + 4)
    d = tl.load(call_ptr + 5)
    n_tiles = tl.load(call_ptr + 6)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles
    tile_j = (offset // TILE + pid % n_tiles) * TILE
    k = (tl.load(call_ptr + 3) + row).to(tl.uint32)
    # Row element i is block element offset + i.
    tile_ptr, lo, hi = tile_span(out_ptr, row * d, offset, d, tile_j, TILE, False)
    if DIST == 0:
        call = tile_j // 4 + tl.arange(0, TILE // 4)
        z0, z1, z2, z3 = gaussian4(call, k, block, key0, key1)
        ptrs, mask = call_tile(tile_ptr, lo, hi, TILE // 4, False)
        tl.store(ptrs, join4(z0, z1, z2, z3), mask=mask)
    else:
        call = tile_j // 128 + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        w0, w1, w2, w3 = rademacher_words(call, k, block, key0, key1)
        ptrs, mask = bit_tile(tile_ptr, lo, hi, 0, TILE // 128)
        tl.store(ptrs, signed_by_bit(1.0, w0, bit), mask=mask)
        ptrs, mask = bit_tile(tile_ptr, lo, hi, 1, TILE // 128)
        tl.store(ptrs, signed_by_bit(1.0, w1, bit), mask=mask)
        ptrs, mask = bit_tile(tile_ptr, lo, hi, 2, TILE // 128)
        tl.store(ptrs, signed_by_bit(1.0, w2, bit), mask=mask)
        ptrs, mask = bit_tile(tile_ptr, lo, hi, 3, TILE // 128)
        tl.store(ptrs, signed_by_bit(1.0, w3, bit), mask=mask)


def prepare(seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
            device) -> tuple[list[Launch], torch.Tensor]:
    """The launch (host work only) and the float32 (K, d) it fills."""
    shape = SHAPES[distribution]
    out = torch.empty((K, d), dtype=torch.float32, device=device)
    n_tiles = (offset + d + shape.tile - 1) // shape.tile - offset // shape.tile
    buf = CallBuffer()
    buf.add(seed_words([seed]))
    buf.add([block, k_begin, offset, d, n_tiles])
    return [Launch(_basis_kernel, (K * n_tiles,), (out, buf.to(out.device)),
                   dict(DIST=DIST_CODE[distribution], TILE=shape.tile), shape.num_warps)], out


def basis_rows(seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
               device) -> torch.Tensor:
    """float32 (K, d) on ``device`` for checked arguments; see functional.basis."""
    launches, out = prepare(seed, K, d, block, offset, k_begin, distribution, device)
    run(launches)
    return out
