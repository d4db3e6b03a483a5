"""Generation-only roofline: regenerate K basis tiles of d elements and sum them.

Reads no input and writes one float per program, so its throughput (elements x bases
per second) is the ceiling project and reconstruct can approach.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rng import gaussian4, rademacher_words, signed_by_bit
from ._tables import DIST_CODE

# Same tile as project/reconstruct so the ceiling is measured on the same code shape.
TILE = 1024


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _generate_sum_kernel(out_ptr, K, seed_lo, seed_hi, TILE: tl.constexpr, DIST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    key0 = seed_lo.to(tl.uint32)
    key1 = seed_hi.to(tl.uint32)
    block = tl.zeros([], dtype=tl.uint32)
    k0 = tl.zeros([], dtype=tl.uint32)
    if DIST == 0:
        call = pid * (TILE // 4) + tl.arange(0, TILE // 4)
        acc = tl.zeros([TILE // 4], dtype=tl.float32)
        for k in range(0, K):
            z0, z1, z2, z3 = gaussian4(call, k0 + k, block, key0, key1)
            acc += (z0 + z1) + (z2 + z3)
    else:
        call = pid * (TILE // 128) + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        ones = tl.full([TILE // 128, 32], 1.0, dtype=tl.float32)
        acc = tl.zeros([TILE // 128, 32], dtype=tl.float32)
        for k in range(0, K):
            w0, w1, w2, w3 = rademacher_words(call, k0 + k, block, key0, key1)
            acc += signed_by_bit(ones, w0, bit) + signed_by_bit(ones, w1, bit)
            acc += signed_by_bit(ones, w2, bit) + signed_by_bit(ones, w3, bit)
    tl.store(out_ptr + pid, tl.sum(acc))


def generate_sum(d: int, K: int, seed: int, distribution: str, device) -> torch.Tensor:
    """Per-tile sums of K basis rows of ceil(d / TILE) * TILE elements (float32)."""
    n_tiles = (d + TILE - 1) // TILE
    out = torch.empty(n_tiles, dtype=torch.float32, device=device)
    _generate_sum_kernel[(n_tiles,)](out, K, seed & 0xFFFFFFFF, seed >> 32, TILE=TILE,
                                     DIST=DIST_CODE[distribution], enable_fp_fusion=False)
    return out
